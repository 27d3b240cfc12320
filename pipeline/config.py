"""Load and validate params.yaml: the single source of truth for every knob.

Each stage has one section. A section may carry ``profiles: {name: {key: value}}`` overrides; the
top-level ``profile`` switch picks which ones apply, so every value a run uses is written in
params.yaml itself. ``load_params()`` returns the resolved, validated, frozen parameters.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from pipeline.classifier.params import TrainClassifierParams
from pipeline.compression.params import TrainCompressorParams
from pipeline.data.params import AugmentParams, DataParams
from pipeline.errors import ParamsError
from pipeline.evaluation.params import EvaluateParams
from pipeline.report.params import ReportParams
from pipeline.schema import PROFILES, Section

PARAMS_FILE = "params.yaml"


class TrackingParams(Section):
    experiment: str = "rnn-compression-cifar10"  # MLflow experiment every stage logs into
    register_models: bool = True  # register trained models in the MLflow Model Registry


#: section name -> schema, in pipeline order
SECTIONS: dict[str, type[Section]] = {
    "data": DataParams,
    "augment": AugmentParams,
    "train_classifier": TrainClassifierParams,
    "train_compressor": TrainCompressorParams,
    "evaluate": EvaluateParams,
    "report": ReportParams,
    "tracking": TrackingParams,
}


class Params(Section):
    profile: Literal["cpu", "gpu", "coursework", "tiny"] = "cpu"
    seed: int = Field(0, ge=0)
    data: DataParams
    augment: AugmentParams
    train_classifier: TrainClassifierParams
    train_compressor: TrainCompressorParams
    evaluate: EvaluateParams
    report: ReportParams
    tracking: TrackingParams

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every resolved value (what MLflow logs)."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _describe(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (where, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{loc}: missing key")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def resolve(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a raw params tree, apply the selected profile's overrides and return Params."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level")
    raw = copy.deepcopy(raw)
    profile = raw.get("profile", "cpu")
    if profile not in PROFILES:
        raise ParamsError(f"{source}: profile: must be one of {', '.join(PROFILES)} (got {profile!r})")
    unknown = sorted(set(raw) - set(SECTIONS) - {"profile", "seed"})
    if unknown:
        raise ParamsError(f"{source}: {unknown[0]}: unknown key (sections: {', '.join(SECTIONS)})")
    for name, schema in SECTIONS.items():
        section = raw.get(name)
        if section is None:
            raise ParamsError(f"{source}: {name}: missing section")
        if not isinstance(section, dict):
            raise ParamsError(f"{source}: {name}: expected a mapping")
        profiles = section.pop("profiles", None) or {}
        if not isinstance(profiles, dict):
            raise ParamsError(f"{source}: {name}.profiles: expected a mapping of profile -> overrides")
        try:  # the base values first, so an error names the key where it is written
            schema.model_validate(section)
        except ValidationError as err:
            raise ParamsError(f"{source}: {_describe(err, name)}") from None
        for pname, override in profiles.items():
            if pname not in PROFILES:
                raise ParamsError(f"{source}: {name}.profiles.{pname}: unknown profile (one of {', '.join(PROFILES)})")
            if not isinstance(override, dict):
                raise ParamsError(f"{source}: {name}.profiles.{pname}: expected a mapping")
            try:  # every profile is checked, not just the active one
                schema.model_validate(deep_merge(section, override))
            except ValidationError as err:
                raise ParamsError(f"{source}: {_describe(err, f'{name}.profiles.{pname}')}") from None
        raw[name] = deep_merge(section, profiles.get(profile, {}))
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{source}: {_describe(err, '')}") from None


def read_raw(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found (run stages from the project root, where params.yaml lives)")
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    return resolve(read_raw(path), str(path))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train_classifier.epochs=3"`` -> (["train_classifier", "epochs"], 3)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {item!r}: expected KEY=VALUE, e.g. train_classifier.epochs=3")
    return key.strip().split("."), yaml.safe_load(value)


def _effective_keys(doc: dict, keys: list[str], profile: str) -> list[str]:
    """Where KEY must be written so the run sees it: in the active profile's block if that sets it."""
    if len(keys) < 2:
        return keys
    node = (doc.get(keys[0]) or {}).get("profiles", {}) or {}
    node = node.get(profile) if isinstance(node, dict) else None
    for k in keys[1:]:
        if not isinstance(node, dict) or k not in node:
            return keys
        node = node[k]
    return [keys[0], "profiles", profile, *keys[1:]]


def set_params(path: str | os.PathLike, profile: str | None, overrides: list[str]) -> bool:
    """Write a profile and KEY=VALUE overrides into params.yaml, keeping its comments.

    Like ``dvc exp run -S``: the file is the record of what a run used, so DVC sees the change.
    A key that the active profile overrides is written in that profile's block, so it takes effect.
    The result is validated before anything is written. Returns True when the file changed.
    """
    from ruamel.yaml import YAML  # ships with DVC; round-trips comments

    ryaml = YAML()
    ryaml.preserve_quotes = True
    path = Path(path)
    read_raw(path)  # clear error if missing or unparsable
    with open(path) as f:
        doc = ryaml.load(f)
    changed = False
    edits = ([(["profile"], profile)] if profile else []) + [parse_override(o) for o in overrides]
    for keys, value in edits:
        keys = _effective_keys(doc, keys, profile or doc.get("profile", "cpu"))
        node = doc
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node:
                raise ParamsError(f"override {'.'.join(keys)}: {k}: unknown key")
            node = node[k]
        if not isinstance(node, dict) or keys[-1] not in node:
            raise ParamsError(f"override {'.'.join(keys)}: unknown key")
        if node[keys[-1]] != value:
            node[keys[-1]] = value
            changed = True
    if not changed:
        return False
    import io

    buf = io.StringIO()
    ryaml.dump(doc, buf)
    resolve(yaml.safe_load(buf.getvalue()), f"{path} (after overrides)")
    from pipeline.utils import atomic_write_text

    atomic_write_text(path, buf.getvalue())
    return True
