"""Base class of every params.yaml section, and the ``Source`` marker of the fields a DAG run's conf may not
set (kept free of imports so any package can use it)."""

from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict

PROFILES = ("cpu", "gpu", "coursework", "tiny")


class _SourceMarker:
    """Marks a params field (or a whole section) that says where data, code or models come from, or
    where results go: a path, a URI, a model reference, what pins one (a checksum). params.yaml, which
    is reviewed and versioned, may set it; a DAG run's conf may not (``pipeline.config.check_run_overrides``)."""

    def __repr__(self) -> str:
        return "SOURCE"


SOURCE = _SourceMarker()
#: a string naming a path, URI or model reference: ``init: Source | None = None``
Source = Annotated[str, SOURCE]


def is_source(annotation: Any, metadata: list | tuple = ()) -> bool:
    """Whether a field's type (its annotation, and the ``metadata`` pydantic split off it) carries SOURCE,
    also inside ``X | None`` and other unions."""
    if any(m is SOURCE for m in metadata):
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return any(m is SOURCE for m in annotation.__metadata__) or is_source(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        return any(is_source(a) for a in get_args(annotation))
    return False


class Section(BaseModel):
    """A typed, frozen params.yaml section: unknown keys are errors, types are checked, and no number
    may be infinite or NaN (``.inf`` epochs would only fail later, deep inside a stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
