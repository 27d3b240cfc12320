"""What the configuration and the report know of each codec, without its implementation: its name, its
params keys (the sweep ``<name>_<setting>`` and each fixed encoder knob ``<name>_<knob>``, written out here
so a search finds them), their defaults (params.yaml's base values), what a valid setting is, its label
and colour. Standard library only: loading params.yaml imports no image library.

``pipeline.evaluation.params`` builds the evaluate section's fields from ``SPECS``; the implementations
(``pipeline.evaluation.codecs``) each name their spec. Adding a codec: a spec here, a class there, its
entry in params.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class Knob:
    """A fixed encoder setting: params key ``evaluate.<key>``, the constructor's keyword ``arg``."""

    key: str
    kind: Any  # int, str, a Literal
    default: Any
    doc: str
    ge: float | None = None
    le: float | None = None
    source: bool = False  # a path, URI or model reference (pipeline.schema.Source: a DAG run may not set it)


@dataclass(frozen=True)
class CodecSpec:
    name: str  # short id used in files, metric names and params keys
    label: str  # display name
    setting: str  # what the sweep varies
    sweep_key: str  # its params key, ``<name>_<setting>``
    color: str  # matplotlib colour of its curves
    default_sweep: tuple[float, ...] | None  # None: the codec picks it (the RNN: 1..max_iterations)
    valid: Callable[[float], bool]  # is one setting valid (checked on every value of the sweep)
    valid_doc: str  # what is valid (the error message)
    sweep_doc: str  # what one setting means (the params field's description)
    setting_type: type = int  # int or float: the type of one setting in params.yaml
    knobs: tuple[Knob, ...] = ()

    def __post_init__(self) -> None:
        if self.sweep_key != f"{self.name}_{self.setting}":
            raise ValueError(f"codec {self.name}: sweep key {self.sweep_key!r} is not {self.name}_{self.setting}")
        for knob in self.knobs:
            if not knob.key.startswith(f"{self.name}_"):
                raise ValueError(f"codec {self.name}: knob key {knob.key!r} does not start with {self.name}_")

    def arg(self, knob: Knob) -> str:
        """The constructor keyword of ``knob``: its key without the codec's name (``webp_method`` -> ``method``)."""
        return knob.key[len(self.name) + 1:]


SPECS: dict[str, CodecSpec] = {}


def add(spec: CodecSpec) -> CodecSpec:
    """One more codec the params, report and plots know of (its implementation registers in codecs.py)."""
    if spec.name in SPECS:
        raise ValueError(f"codec {spec.name}: already specified")
    SPECS[spec.name] = spec
    return spec


add(CodecSpec("jpeg", "JPEG", "quality", "jpeg_quality", "tab:blue", (1, 3, 5, 10, 20, 30, 50, 70, 90),
              lambda q: 1 <= q <= 100, "1..100", "libjpeg quality 1..95"))
add(CodecSpec("jpeg2000", "JPEG 2000", "ratio", "jpeg2000_ratio", "tab:orange", (300, 240, 160, 96, 64, 40, 24, 12),
              lambda r: r > 1, "compression ratios are > 1", "compression ratio R (24/R bpp)", float))
add(CodecSpec("webp", "WebP", "quality", "webp_quality", "tab:green", (0, 5, 10, 20, 40, 70, 90),
              lambda q: 0 <= q <= 100, "0..100", "libwebp quality 0..100",
              knobs=(Knob("webp_method", int, 4, "libwebp effort: 0 fast .. 6 slow/best", 0, 6),)))
add(CodecSpec("avif", "AVIF", "quality", "avif_quality", "tab:purple", (0, 10, 20, 30, 45, 60, 80, 90),
              lambda q: 0 <= q <= 100, "0..100", "libavif quality 0..100",
              knobs=(Knob("avif_speed", int, 6, "libavif encoder speed: 0 slow/best .. 10 fast", 0, 10),)))
add(CodecSpec("jpegxl", "JPEG XL", "distance", "jpegxl_distance", "tab:brown", (25, 15, 10, 6, 3, 2, 1),
              lambda d: d > 0, "distances are > 0", "butteraugli distance (lower: better)", float,
              knobs=(Knob("jpegxl_effort", int, 7, "libjxl effort: 1 fast .. 9 slow/best (7: libjxl's default)",
                          1, 9),)))
add(CodecSpec("rnn", "RNN (ours)", "iterations", "rnn_iterations", "tab:red", None,
              lambda k: k >= 1, "counts are >= 1", "iteration counts; None: 1..max_iterations (one encode, truncated)",
              knobs=(Knob("rnn_model", str, "data/compressor/model.pt",
                          "checkpoint path or MLflow model URI of the RNN codec", source=True),
                     Knob("rnn_precision", Literal["auto", "fp32", "bf16"], "auto",
                          "the network's arithmetic: auto (bf16 where native, else fp32), fp32 or bf16"))))
