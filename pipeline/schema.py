"""Base class of every params.yaml section (kept free of imports so any package can use it)."""

from pydantic import BaseModel, ConfigDict

PROFILES = ("cpu", "gpu", "coursework", "tiny")


class Section(BaseModel):
    """A typed, frozen params.yaml section: unknown keys are errors, types are checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
