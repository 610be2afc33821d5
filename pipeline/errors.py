"""Errors a user can act on. Each carries a one-line message and the exit code the CLI uses.

Exit code 2: something the user must fix before the run can go on (config, model, labels, an
unreadable video, a command-line argument, an endpoint that cannot be bound, a missing engine).
Exit code 1: a run that started and then failed.
"""


class PipelineError(Exception):
    """An expected failure: printed as one line without a traceback."""

    exit_code = 1


class ConfigError(PipelineError):
    """The configuration (file, key or value) is wrong; the run cannot start."""

    exit_code = 2


class ModelError(PipelineError):
    """The model file is missing, unreadable or not what the preset expects."""

    exit_code = 2


class UsageError(PipelineError):
    """A command-line argument is wrong (a value out of range, a folder that does not exist)."""

    exit_code = 2


class SourceError(PipelineError):
    """A video source could not be opened or read once the run was going (files are probed before)."""


class PublishError(PipelineError):
    """The publisher could not bind its endpoint (for example: port in use); nothing can be published."""

    exit_code = 2
