"""The runtime of the pipeline: configuration, records, queues, stages, metrics and wiring."""
