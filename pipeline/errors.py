"""Errors a user can act on. Each carries a one-line message and the exit code the CLI uses."""


class PipelineError(Exception):
    """An expected failure: printed as one line without a traceback."""

    exit_code = 1


class ConfigError(PipelineError):
    """The configuration (file, key or value) is wrong; the run cannot start."""

    exit_code = 2


class ModelError(PipelineError):
    """The model file is missing, unreadable or not what the preset expects."""

    exit_code = 2


class SourceError(PipelineError):
    """A video source could not be opened or read."""


class PublishError(PipelineError):
    """The publisher could not bind its endpoint (for example: port in use)."""
