"""Base class of every params.yaml section (kept free of imports so any package can use it)."""

from pydantic import BaseModel, ConfigDict

PROFILES = ("cpu", "gpu", "coursework", "tiny")


class Section(BaseModel):
    """A typed, frozen params.yaml section: unknown keys are errors, types are checked, and no number
    may be infinite or NaN (``.inf`` epochs would only fail later, deep inside a stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
