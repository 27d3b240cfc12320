"""Every codec the evaluation compares, as a small class over one interface (after CompressAI's
``utils/bench``): ``name``, ``label``, ``setting`` (what the sweep varies), ``settings`` (the sweep),
``encode(img, setting) -> bytes`` (the real file) and ``decode(bytes) -> uint8 HxWx3``;
``sweep(img)`` codes one image at every setting (the RNN codec overrides it: one encode at the
largest iteration count, the lower counts by truncating its progressive file). ``config()`` lists the
fixed encoder settings, which the report prints: a baseline is only as good as its settings.

This module is the codec registry: each class names its specification (``pipeline.evaluation.specs``:
name, params keys and defaults, validity, label, colour), which the params schema and the report read
without importing this module, and everything iterates ``REGISTRY`` instead of naming codecs: ``build``
(``from_params``), the figures (``color``) and the dvc.yaml plots (a test checks one
``curves/<name>.csv`` per codec). Adding a codec is its spec, one class here (decorated with
``@register``) and its entry in params.yaml.
"""

from __future__ import annotations

import importlib.util
import io
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, features
from pipeline.errors import PipelineError
from pipeline.images import bits_per_pixel as bpp  # noqa: F401 - the one bpp formula, under its old name here
from pipeline.evaluation.specs import SPECS, CodecSpec, Knob


@dataclass
class Coded:
    """One image coded at one setting: the real file, what decoding it gives, and the time spent."""

    setting: float
    data: bytes
    decoded: np.ndarray
    encode_s: float
    decode_s: float


class Codec(ABC):
    #: what the configuration knows of it (set in the class body); name, label, setting, color, setting_type,
    #: default_sweep and sweep_doc are copied from it as class attributes
    spec: CodecSpec | None = None
    name: str = ""  # short id used in files, metric names and params keys
    label: str = ""  # display name
    setting: str = ""  # what the sweep varies; params key ``spec.sweep_key``
    color: str = ""  # matplotlib colour of its curves
    setting_type: type = int  # int or float: the type of one setting in params.yaml
    default_sweep: tuple[float, ...] | None = ()  # the sweep when params.yaml does not give one
    sweep_doc: str = ""
    #: fixed encoder settings: constructor keyword -> Knob (params key ``knob.key``)
    knobs: dict[str, Knob] = {}
    #: True when encode_s/decode_s are one per image, shared by all its settings (the RNN's one encode)
    shared_timing: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            for attr in ("name", "label", "setting", "color", "setting_type", "default_sweep", "sweep_doc"):
                setattr(cls, attr, getattr(spec, attr))
            cls.knobs = {spec.arg(k): k for k in spec.knobs}

    def __init__(self, settings: Sequence[Any]):
        self.settings = list(settings)

    @classmethod
    def sweep_key(cls) -> str:
        """The params key of the sweep, e.g. ``jpeg_quality``."""
        return cls.spec.sweep_key

    @classmethod
    def from_params(cls, params, device: str = "cpu", rnn_loader=None) -> "Codec":
        """The codec as ``params`` (an EvaluateParams) configures it."""
        return cls(getattr(params, cls.sweep_key()), **{arg: getattr(params, k.key) for arg, k in cls.knobs.items()})

    @classmethod
    def library(cls) -> str | None:
        """The library (and version) that codes this format here, for the report's provenance."""
        return None

    def available(self) -> str | None:
        """None when usable here, else why not (the codec is then skipped, with a note)."""
        return None

    def describe(self) -> str:
        return self.label

    def config(self) -> dict[str, str]:
        """The fixed encoder settings (what the sweep does not vary), for the report."""
        return {}

    @abstractmethod
    def encode(self, img: np.ndarray, setting: Any) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes) -> np.ndarray: ...

    def sweep(self, img: np.ndarray) -> Iterator[Coded]:
        """``img`` coded at every setting, each through its own file."""
        for s in self.settings:
            t0 = time.perf_counter()
            data = self.encode(img, s)
            t1 = time.perf_counter()
            decoded = self.decode(data)
            t2 = time.perf_counter()
            yield Coded(float(s), data, decoded, t1 - t0, t2 - t1)


class PillowCodec(Codec):
    """A format Pillow writes and reads; subclasses map a setting to save() options."""

    format: str = ""
    feature: str = ""

    def options(self, setting: Any) -> dict[str, Any]:
        raise NotImplementedError

    def available(self) -> str | None:
        if self.feature and not features.check(self.feature):
            return f"Pillow was built without {self.feature}"
        return None

    @classmethod
    def library(cls) -> str | None:
        return f"{cls.feature} {features.version(cls.feature)}" if cls.feature and features.check(cls.feature) else None

    def describe(self) -> str:
        version = features.version(self.feature) if self.feature else None
        return f"{self.label} (Pillow, {self.feature} {version})" if version else self.label

    def encode(self, img: np.ndarray, setting: Any) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, self.format, **self.options(setting))
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))


REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: the implementation of a codec ``pipeline.evaluation.specs.SPECS`` holds."""
    if cls.spec is None or SPECS.get(cls.name) is not cls.spec or cls.name in REGISTRY:
        raise ValueError(f"codec {cls.__name__}: needs a spec of SPECS, not yet registered")
    REGISTRY[cls.name] = cls
    return cls


@register
class JPEG(PillowCodec):
    spec, format, feature = SPECS["jpeg"], "JPEG", "jpg"

    @classmethod
    def library(cls) -> str | None:
        return f"libjpeg_turbo {features.version('libjpeg_turbo')}" if features.check("libjpeg_turbo") else \
            super().library()

    def describe(self) -> str:
        turbo = features.version("libjpeg_turbo") if features.check("libjpeg_turbo") else None
        return f"JPEG (Pillow, libjpeg-turbo {turbo})" if turbo else super().describe()

    def config(self):
        return {"process": "baseline sequential (SOF0)", "chroma": "YCbCr 4:2:0",
                "Huffman tables": "optimised per image (cjpeg -optimize)", "quantisation": "IJG tables scaled by quality"}

    def options(self, q):  # baseline, 4:2:0, optimised Huffman tables (cjpeg -optimize)
        return {"quality": int(q), "optimize": True, "subsampling": "4:2:0", "progressive": False}


@register
class JPEG2000(PillowCodec):
    spec, format, feature = SPECS["jpeg2000"], "JPEG2000", "jpg_2000"

    def config(self):
        return {"wavelet": "9/7 irreversible", "colour transform": "MCT on (irreversible YCbCr, ICT)",
                "rate control": "one quality layer at 24/ratio bpp", "container": "raw codestream (.j2k, no JP2 box)"}

    def options(self, ratio):  # raw codestream (no JP2 box), 9/7 irreversible wavelet, colour transform, one layer
        return {"quality_mode": "rates", "quality_layers": [float(ratio)], "irreversible": True, "mct": 1,
                "no_jp2": True}


@register
class WebP(PillowCodec):
    spec, format, feature = SPECS["webp"], "WEBP", "webp"

    def __init__(self, settings, method: int = SPECS["webp"].knobs[0].default):
        super().__init__(settings)
        self.method = method

    def config(self):
        return {"mode": "lossy (VP8, YUV 4:2:0)", "method": f"{self.method} (0 fast .. 6 best)"}

    def options(self, q):
        return {"quality": int(q), "method": self.method, "lossless": False}


@register
class AVIF(PillowCodec):
    spec, format, feature = SPECS["avif"], "AVIF", "avif"

    def __init__(self, settings, speed: int = SPECS["avif"].knobs[0].default):
        super().__init__(settings)
        self.speed = speed

    def describe(self) -> str:
        try:
            from PIL import _avif

            return f"AVIF (Pillow, libavif {features.version('avif')}; {_avif.codec_versions()})"
        except (ImportError, AttributeError):
            return super().describe()

    def config(self):
        return {"chroma": "YUV 4:2:0, 8 bit", "speed": f"{self.speed} (0 best .. 10 fastest)",
                "encoder": "libavif's default (aom)"}

    def options(self, q):  # 4:2:0, libavif's default encoder
        return {"quality": int(q), "speed": self.speed, "subsampling": "4:2:0"}


@register
class JPEGXL(Codec):
    """JPEG XL through imagecodecs (libjxl); skipped with a note only if imagecodecs lacks libjxl."""

    spec = SPECS["jpegxl"]

    def __init__(self, settings, effort: int = SPECS["jpegxl"].knobs[0].default):
        super().__init__(settings)
        self.effort = effort

    def available(self) -> str | None:
        if importlib.util.find_spec("imagecodecs") is None:
            return "imagecodecs is not installed"
        import imagecodecs

        if not getattr(imagecodecs, "JPEGXL", None) or not imagecodecs.JPEGXL.available:
            return "imagecodecs has no JPEG XL support"
        return None

    @classmethod
    def library(cls) -> str | None:
        try:
            import imagecodecs

            return f"{imagecodecs.jpegxl_version()} (imagecodecs {imagecodecs.__version__})"
        except (ImportError, AttributeError):
            return None

    def describe(self) -> str:
        import imagecodecs

        return f"JPEG XL (imagecodecs {imagecodecs.__version__}, {imagecodecs.jpegxl_version()})"

    def config(self):
        return {"mode": "lossy (VarDCT, XYB)", "effort": f"{self.effort} (1 fast .. 9 best; libjxl default 7)",
                "container": "raw codestream"}

    def encode(self, img, distance):
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(img, distance=float(distance), effort=self.effort, lossless=False))

    def decode(self, data):
        import imagecodecs

        out = np.asarray(imagecodecs.jpegxl_decode(data))
        return np.ascontiguousarray(out[..., :3]).astype(np.uint8)


def load_rnn(model: str, device: str = "cpu", precision: str = "auto"):
    """The RNN codec object of ``pipeline.compression.codec`` (contract: compress/decompress/max_iterations),
    its network at ``precision`` (auto: bf16 where native, else fp32)."""
    try:
        from pipeline.compression.codec import load_codec
    except ImportError as err:
        raise PipelineError(f"the RNN codec is not available (pipeline.compression.codec: {err})") from None
    return load_codec(model, device=device, precision=precision)


def _module_truncate(data: bytes, iterations: int) -> bytes:
    from pipeline.compression.rnncfile import truncate

    return truncate(data, iterations)


@register
class RNN(Codec):
    """The recurrent codec through its real file format: k iterations -> one .rnnc file.

    ``sweep`` encodes each image once, at the largest iteration count, and makes the file of every
    lower count by truncating that progressive file (``truncate(data, k)``: a standalone file equal to
    encoding with k iterations); one progressive decode gives every count's image. bpp always comes
    from the truncated file's real size.
    """

    spec = SPECS["rnn"]
    shared_timing = True

    @classmethod
    def from_params(cls, params, device: str = "cpu", rnn_loader=None) -> "RNN":
        import inspect

        loader = rnn_loader or load_rnn
        # a loader's contract is loader(model, device); one that takes precision (load_rnn does) gets it
        extra = {"precision": params.rnn_precision} if "precision" in inspect.signature(loader).parameters else {}
        return cls(loader(params.rnn_model, device=device, **extra), params.rnn_iterations)

    def __init__(self, codec, settings: Sequence[int] | None = None):
        self.codec = codec
        # the codec object's own truncate (test stand-ins) or pipeline.compression.rnncfile.truncate
        self._truncate = getattr(codec, "truncate", None) or _module_truncate
        top = int(codec.max_iterations)
        settings = list(range(1, top + 1)) if settings is None else [int(k) for k in settings]
        dropped = [k for k in settings if not 1 <= k <= top]
        settings = [k for k in settings if 1 <= k <= top]
        if dropped:
            from pipeline.utils import log

            log(f"[evaluate] rnn: dropping iterations {dropped} (the model stops at {top})")
        if not settings:
            raise PipelineError(f"evaluate.rnn_iterations: none within 1..{top} (the model's max_iterations)")
        super().__init__(settings)

    def _variant(self) -> tuple[str, str, int]:
        """(cell, reconstruction, priming) of the model: which of Toderici 2017's (and Johnston 2018's)
        variants is evaluated."""
        cfg = getattr(getattr(self.codec, "model", None), "config", None)
        return getattr(cfg, "cell", "lstm"), getattr(cfg, "reconstruction", "additive"), getattr(cfg, "priming", 0)

    def describe(self) -> str:
        cell, reconstruction, priming = self._variant()
        primed = f", {priming} priming steps" if priming else ""
        return (f"RNN codec (Conv{cell.upper()}, {reconstruction}{primed}, "
                f"up to {self.codec.max_iterations} iterations)")

    def encode(self, img, iterations):
        return bytes(self.codec.compress(img, int(iterations)))

    def decode(self, data):
        return np.asarray(self.codec.decompress(data), dtype=np.uint8)

    def config(self):
        cell, reconstruction, priming = self._variant()
        precision = getattr(self.codec, "precision", None)
        return {"iterations": f"up to {self.codec.max_iterations}", "cell": cell, "reconstruction": reconstruction,
                **({"precision": precision} if precision else {}),
                **({"priming": f"{priming} steps"} if priming else {}),
                "sweep": "one encode at the largest count; lower counts are truncations of that file"}

    def sweep(self, img: np.ndarray) -> Iterator[Coded]:
        top = max(self.settings)
        t0 = time.perf_counter()
        full = self.encode(img, top)
        t1 = time.perf_counter()
        every = self.codec.decompress_progressive(full)
        t2 = time.perf_counter()
        lowest = min(self.settings)
        for k in self.settings:
            data = bytes(self._truncate(full, int(k))) if k != top else full
            decoded = np.asarray(every[int(k) - 1], dtype=np.uint8)
            if k == lowest and k != top:  # cheap guard: the shortest file, decoded on its own, gives the same image
                alone = self.decode(data)
                if not np.array_equal(alone, decoded):
                    raise PipelineError(f"rnn: the {k}-iteration file decodes differently from the progressive "
                                        "decode of the full file; truncation is broken")
            yield Coded(float(k), data, decoded, t1 - t0, t2 - t1)


def build(params, device: str = "cpu", rnn_loader=load_rnn) -> tuple[list[Codec], dict[str, str]]:
    """The codecs ``params`` (an EvaluateParams) asks for, and {name: why skipped} for those not usable."""
    codecs, skipped = [], {}
    for name in params.codecs:
        codec = REGISTRY[name].from_params(params, device=device, rnn_loader=rnn_loader)
        why = codec.available()
        if why:
            skipped[name] = why
        else:
            codecs.append(codec)
    return codecs, skipped


def color(name: str) -> str | None:
    """The colour of a codec's curves (None, matplotlib's next, for a name not registered)."""
    return REGISTRY[name].color if name in REGISTRY else None
