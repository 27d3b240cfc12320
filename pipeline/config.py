"""Load and validate params.yaml: the single source of truth for every knob.

Each stage has its section(s), found, not listed: every module-level ``PARAMS_SECTIONS = {name: schema}``
under ``pipeline/`` (``pipeline.stage.marked``; today each package's ``params.py``) adds its sections to
``Params``, after ``profile`` and ``seed``, in the order found (by file path), then ``tracking`` (this
module's own). A module holding one must be light to import: importing this one must not import torch,
PIL, imagecodecs or mlflow. A section may carry ``profiles: {name: {key: value}}`` overrides; the
top-level ``profile`` switch picks which ones apply, so every value a run uses is written in
params.yaml itself. ``load_params()`` returns the resolved, validated, frozen parameters.

Defaults: each section class keeps field defaults (so it can be built without params.yaml, in tests and
scripts), but they are params.yaml's base values, the ones that run: tests/test_config_defaults.py fails
on any difference, and nothing else (a model's constructor, a codec class) repeats them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, get_args

import yaml
from pydantic import Field, ValidationError, create_model

from pipeline.errors import ParamsError
from pipeline.schema import PROFILES, SOURCE, Section, is_source
from pipeline.stage import marked

PARAMS_FILE = "params.yaml"


class TrackingParams(Section):
    experiment: str = "rnn-compression-cifar10"  # MLflow experiment every stage logs into
    register_models: bool = True  # register trained models in the MLflow Model Registry


#: the sections that are no stage's: this module's own
OWN_SECTIONS: dict[str, Any] = {"tracking": Annotated[TrackingParams, SOURCE]}  # where runs and models are recorded


def _field_sections(annotation: Any) -> list[type[Section]]:
    """The params sections a field's type holds (``X``, ``X | None``, ``Annotated[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    return [s for arg in get_args(annotation) for s in _field_sections(arg)]


def found_sections() -> dict[str, Any]:
    """Section name -> its field type (a Section subclass, or ``Annotated[X, SOURCE]``: a section that says
    where data or results are), from every module-level ``PARAMS_SECTIONS`` under ``pipeline/``, then ours."""
    found: dict[str, Any] = {}
    where = {"profile": __name__, "seed": __name__, **{name: __name__ for name in OWN_SECTIONS}}
    for module_name in marked("PARAMS_SECTIONS"):
        declared = getattr(importlib.import_module(module_name), "PARAMS_SECTIONS", None)
        if not isinstance(declared, dict):
            raise TypeError(f"{module_name}.PARAMS_SECTIONS: expected a dict, section name -> Section subclass")
        for name, annotation in declared.items():
            if name in where:
                raise TypeError(f"params section {name!r}: defined in both {where[name]} and {module_name}")
            if len(_field_sections(annotation)) != 1:
                raise TypeError(f"{module_name}.PARAMS_SECTIONS[{name!r}]: expected a pipeline.schema.Section "
                                f"subclass (or Annotated[it, SOURCE]), got {annotation!r}")
            found[name], where[name] = annotation, module_name
    return {**found, **OWN_SECTIONS}


class _ParamsBase(Section):
    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every resolved value (what MLflow logs)."""
        return flatten(self.model_dump(mode="json"))


_FIELDS = found_sections()
#: section name -> schema
SECTIONS: dict[str, type[Section]] = {name: _field_sections(annotation)[0] for name, annotation in _FIELDS.items()}
#: the whole params.yaml: ``profile``, ``seed`` and one field per section (``params.train_classifier`` ...)
Params = create_model(
    "Params", __base__=_ParamsBase, __module__=__name__,
    profile=(Literal[PROFILES], "cpu"),  # type: ignore[valid-type]  (the tuple in pipeline.schema)
    seed=(int, Field(0, ge=0)),
    **{name: (annotation, ...) for name, annotation in _FIELDS.items()},
)


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
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where}: {what}") from None


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


def source_keys(schema: type[Section] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema`` (default: Params) whose type is marked ``Source`` (a path, URI or
    model reference: ``pipeline.schema``), a marked section as ``section.*``."""
    keys = []
    for name, field in (schema or Params).model_fields.items():
        if is_source(field.annotation, field.metadata):
            keys.append(f"{prefix}{name}" + (".*" if _field_sections(field.annotation) else ""))
        else:
            for section in _field_sections(field.annotation):
                keys.extend(source_keys(section, f"{prefix}{name}."))
    return keys


def check_run_overrides(overrides: list[str]) -> None:
    """Refuse (ParamsError, naming the key) a DAG-run override of a key whose type marks it a source
    (``pipeline.schema.Source``: a path, URI or model reference, or a section of them), of a section or
    profile block that holds one, or of a key the params do not have. Decided from the params' types, so
    a source key added later is refused too; what a run conf may set are the training and evaluation
    knobs (``profile``, ``seed``, ``train_classifier.epochs``...). Nothing is read or requested."""
    for item in overrides:
        keys, _ = parse_override(item)
        plain = list(keys)
        if len(plain) > 1 and plain[1] == "profiles":  # train_classifier.profiles.tiny.epochs -> .epochs
            plain = [plain[0], *plain[3:]]  # (.profiles or .profiles.tiny alone: the whole section)
        why, schema = None, Params
        for i, key in enumerate(plain):
            field = schema.model_fields.get(key) if schema is not None else None
            if field is None:
                why = "the params have no such key"
                break
            if is_source(field.annotation, field.metadata):
                why = (f"{'.'.join(plain[:i + 1])}.* says where data or models come from or results go"
                       if _field_sections(field.annotation) else "it is a path, URI or model reference")
                break
            sections = _field_sections(field.annotation)
            if i == len(plain) - 1 and sections:
                held = source_keys(sections[0], ".".join(plain) + ".")
                if held:
                    why = f"it holds {held[0]}, a path, URI or model reference"
            schema = sections[0] if sections else None
        if why:
            raise ParamsError(f"run conf may not set {'.'.join(keys)}: {why}; a DAG run sets training and "
                              "evaluation knobs only: edit params.yaml instead")


@contextlib.contextmanager
def params_lock(path: str | os.PathLike, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a params file) so read-modify-write cycles never overlap.

    The lock file lives in ``.dvc/tmp`` beside it (git-ignored), else in the system temp folder.
    A second writer waits; with ``timeout_s`` it gives up with a ParamsError.
    """
    import fcntl
    import hashlib
    import tempfile
    import time

    path = Path(path).resolve()
    dvc_tmp = path.parent / ".dvc" / "tmp"
    if (path.parent / ".dvc").is_dir():
        dvc_tmp.mkdir(exist_ok=True)
        lock = dvc_tmp / f"{path.name}.lock"
    else:
        lock = Path(tempfile.gettempdir()) / f"pipeline-{hashlib.sha1(str(path).encode()).hexdigest()[:16]}.lock"
    with open(lock, "a") as f:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ParamsError(f"{path}: locked by another writer for {timeout_s:g} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flow_text(value: Any, flow: bool) -> str:
    """``value`` as one line of YAML (flow style); strings JSON-quoted inside flow collections."""
    import json

    if flow and isinstance(value, str):
        return json.dumps(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...")
    if "\n" in text:
        raise ValueError("multi-line value")
    return text


def _value_end(line: str, col: int, flow: bool) -> int:
    """End column of the YAML value written at ``line[col:]`` (one line only; ValueError otherwise)."""
    if col >= len(line):
        raise ValueError("value not on the key's line")
    c = line[col]
    if c in "|>&*!":
        raise ValueError("block scalar, anchor, alias or tag")
    if c in "[{":
        depth, quote, i = 0, None, col
        while i < len(line):
            ch = line[i]
            if quote:
                if ch == "\\" and quote == '"':
                    i += 1
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("collection spans lines")
    if c in "\"'":
        i = col + 1
        while i < len(line):
            if c == '"' and line[i] == "\\":
                i += 2
                continue
            if line[i] == c:
                if c == "'" and line[i + 1:i + 2] == "'":
                    i += 2
                    continue
                return i + 1
            i += 1
        raise ValueError("quoted scalar spans lines")
    end = len(line)
    hash_at = line.find(" #", col)
    if hash_at >= 0:
        end = hash_at
    if flow:
        for stop in ",]}":
            at = line.find(stop, col, end)
            if at >= 0:
                end = at
    return len(line[:end].rstrip())


def _edit_lines(text: str, doc, edits: list[tuple[list[str], Any]]) -> str:
    """Replace only the values of ``edits`` in ``text`` (ruamel ``doc`` gives their positions).

    Each value keeps its line, its comment and (when it fits) the comment's column. ValueError when
    a value cannot be edited in place (multi-line, block scalar...).
    """
    lines = text.split("\n")
    spots = []
    for keys, value in edits:
        node, flow = doc, False
        for k in keys[:-1]:
            node = node[k]
            flow = flow or bool(getattr(node, "fa", None) and node.fa.flow_style())
        _, _, vline, vcol = node.lc.data[keys[-1]]
        spots.append((vline, vcol, flow, value))
    for vline, vcol, flow, value in sorted(spots, key=lambda s: (s[0], s[1]), reverse=True):
        line = lines[vline]
        end = _value_end(line, vcol, flow)
        new = _flow_text(value, flow)
        rest = line[end:]
        if not flow and rest.lstrip().startswith("#"):  # keep the comment's column when the value fits
            gap = len(rest) - len(rest.lstrip())
            rest = " " * max(1, gap + (end - vcol) - len(new)) + rest.lstrip()
        lines[vline] = line[:vcol] + new + rest
    return "\n".join(lines)


def set_params(path: str | os.PathLike, profile: str | None, overrides: list[str]) -> bool:
    """Write a profile and KEY=VALUE overrides into params.yaml, changing only the lines they set.

    Like ``dvc exp run -S``: the file is the record of what a run used, so DVC sees the change.
    A key that the active profile overrides is written in that profile's block, so it takes effect.
    Each value is replaced in place (comments, layout and every other line untouched); the result is
    validated before anything is written, and concurrent writers are serialised (``params_lock``).
    Returns True when the file changed.
    """
    path = Path(path)
    with params_lock(path):
        return _set_params(path, profile, overrides)


def _set_params(path: Path, profile: str | None, overrides: list[str]) -> bool:
    from ruamel.yaml import YAML  # ships with DVC; round-trips comments and knows every value's position

    ryaml = YAML()
    ryaml.preserve_quotes = True
    read_raw(path)  # clear error if missing or unparsable
    text = path.read_text()
    doc = ryaml.load(text)
    expected = yaml.safe_load(text)
    edits = []
    for keys, value in ([(["profile"], profile)] if profile else []) + [parse_override(o) for o in overrides]:
        keys = _effective_keys(doc, keys, profile or doc.get("profile", "cpu"))
        node, plain = doc, expected
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node:
                raise ParamsError(f"override {'.'.join(keys)}: {k}: unknown key")
            node, plain = node[k], plain[k]
        if not isinstance(node, dict) or keys[-1] not in node:
            raise ParamsError(f"override {'.'.join(keys)}: unknown key")
        if plain[keys[-1]] != value or type(plain[keys[-1]]) is not type(value):
            plain[keys[-1]] = value
            edits = [e for e in edits if e[0] != keys] + [(keys, value)]
    if not edits:
        return False
    try:
        new_text = _edit_lines(text, doc, edits)
        if yaml.safe_load(new_text) != expected:
            raise ValueError("in-place edit did not give the intended values")
    except (ValueError, KeyError, IndexError, yaml.YAMLError):  # rare layouts: a full round-trip dump
        import io

        for keys, value in edits:
            node = doc
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
        buf = io.StringIO()
        ryaml.dump(doc, buf)
        new_text = buf.getvalue()
    resolve(yaml.safe_load(new_text), f"{path} (after overrides)")
    if new_text == text:
        return False
    from pipeline.utils import atomic_write_text

    atomic_write_text(path, new_text)
    return True
