"""The errors of the RNN codec: each one a user can cause, so each a :class:`pipeline.errors.PipelineError`
(one line on stderr and a non-zero exit from ``rnnc``)."""

from __future__ import annotations

from pipeline.errors import PipelineError


class CodecError(PipelineError):
    """Any error of the codec a user can cause."""


class BitstreamError(CodecError):
    """The bytes are not a (complete, intact, acceptable) .rnnc file."""


class ModelMismatchError(CodecError):
    """The file was made by another model than the one decoding it."""


class ModelError(CodecError):
    """The model could not be loaded."""


class InputError(CodecError):
    """The input image is unusable."""


class OutOfMemory(CodecError):
    """Coding ran out of memory (numpy's or torch's)."""

