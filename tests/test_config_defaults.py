"""One home for every default: params.yaml's base values (what runs) are also the section classes' field
defaults, so a class used without params.yaml (tests, scripts) behaves as the pipeline does."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from pipeline.config import SECTIONS, Params, read_raw
from pipeline.schema import Section
from tests.conftest import REPO


def _plain(value):
    """Tuples as lists, recursively (params.yaml has no tuples)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _nested(annotation) -> type[Section] | None:
    from pipeline.config import _field_sections

    found = _field_sections(annotation)
    return found[0] if found else None


def drift(schema: type[BaseModel], base: dict, where: str) -> list[str]:
    """Every key ``base`` (a section of params.yaml, profiles left out) sets whose field default differs."""
    out = []
    for key, value in base.items():
        if key == "profiles":
            continue
        field = schema.model_fields[key]
        nested = _nested(field.annotation)
        if nested is not None and isinstance(value, dict):
            out += drift(nested, value, f"{where}{key}.")
            continue
        if field.is_required():
            out.append(f"{where}{key}: no default (params.yaml: {value!r})")
            continue
        default = _plain(field.get_default(call_default_factory=True))
        if default != value or type(default) is not type(value) and not isinstance(value, (int, float)):
            out.append(f"{where}{key}: default {default!r}, params.yaml {value!r}")
    return out


def test_drift_is_found():
    class Inner(Section):
        a: int = 1

    class Outer(Section):
        inner: Inner = Inner()
        b: tuple[int, ...] = (1, 2)
        c: str = "x"

    assert drift(Outer, {"inner": {"a": 1}, "b": [1, 2], "c": "x", "profiles": {}}, "") == []
    assert drift(Outer, {"inner": {"a": 2}, "b": [1], "c": "x"}, "s.") == [
        "s.inner.a: default 1, params.yaml 2", "s.b: default [1, 2], params.yaml [1]"]


@pytest.mark.parametrize("section", ["(top)", *SECTIONS])
def test_field_defaults_are_params_yaml_base_values(section):
    raw = read_raw(REPO / "params.yaml")
    if section == "(top)":
        found = drift(Params, {k: v for k, v in raw.items() if k not in SECTIONS}, "")
    else:
        found = drift(SECTIONS[section], raw[section], f"{section}.")
    assert not found, "defaults that differ from params.yaml: " + "; ".join(found)
