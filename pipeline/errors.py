"""Errors a user can cause. They end a command with one clear message and a non-zero exit."""


class PipelineError(Exception):
    """A user-facing error: bad params, missing data, checksum mismatch, corrupt input..."""

    exit_code = 1


class ParamsError(PipelineError):
    """params.yaml (or an override of it) is invalid."""

    exit_code = 2
