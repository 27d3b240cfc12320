"""How the report writes numbers: ``n/a`` for a missing or non-finite value, else fixed digits."""

from __future__ import annotations

import math
from typing import Any


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, digits: int = 4, pct: bool = False, signed: bool = False) -> str:
    if not finite(v):
        return "n/a"
    text = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return text + ("%" if pct else "")


TTA_NAMES = {0: "none", 1: "horizontal flip", 2: "flip and 1-px shifts"}  # train_classifier.tta's levels
