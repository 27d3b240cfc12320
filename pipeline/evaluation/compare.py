"""One photo, every codec, one rate: ``rnnc compare photo.png --bpp 0.25`` (pipeline/compression/cli.py).

Each codec of the registry (``pipeline.evaluation.codecs``) codes the photo at the setting of its quality knob
whose real file is nearest the target rate (nearest in log-bpp): a search over the knob (``SEARCH``: its
range, whether bpp grows with it, a first guess), each probe a real encode of the whole photo, bracketed
and then interpolated in (knob, log bpp) until the file is within ``tol`` of the target or the probes run
out. The RNN codec encodes once with enough iterations and reads every lower count's size from the
truncated files (a truncation is byte-identical to encoding with fewer iterations); the count nearest the
target is then encoded on its own, so its encode time is that file's. Only the chosen file of each codec
is decoded and scored: MS-SSIM (5-scale) and PSNR as the evaluate stage measures them
(``pipeline.evaluation.metrics``), encode and decode times.

Writes ``<stem>.compare.png`` (per codec: the full view with the zoomed region outlined, and that region
enlarged), ``<stem>.compare.html`` (the table and the picture) and ``<stem>.compare.json`` (the numbers)
into the output folder; each through a temporary file renamed into place, after every codec has run, and
an existing file of those names is refused unless asked to replace it (``overwrite``).
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation import codecs as C
from pipeline.images import bits_per_pixel


@dataclass(frozen=True)
class Space:
    """A codec's quality knob as the search sees it."""

    lo: float
    hi: float
    integer: bool
    log: bool  # search in log(knob) (ratios, distances)
    grows: bool  # bpp grows with the knob (quality) or shrinks (ratio, distance)
    guess: Callable[[float], float]  # first probe for a target bpp


#: the quality knob of each classical codec (the RNN codec's is its iteration count, searched apart)
SEARCH: dict[str, Space] = {
    "jpeg": Space(1, 100, True, False, True, lambda t: 15 if t < 0.4 else 50),
    "webp": Space(0, 100, True, False, True, lambda t: 30 if t < 0.4 else 70),
    "avif": Space(0, 100, True, False, True, lambda t: 35 if t < 0.4 else 60),
    "jpeg2000": Space(2.0, 3000.0, False, True, False, lambda t: 24.0 / t),  # rate control: 24/ratio bpp
    "jpegxl": Space(0.05, 25.0, False, True, False, lambda t: 6.0 if t < 0.4 else 2.5),
}
MAX_PROBES = 10
TOL = 0.02  # a file within 2 % of the target rate ends the search


@dataclass
class Result:
    codec: str
    label: str
    setting_name: str
    setting: float
    bytes: int
    bpp: float
    ms_ssim: float
    ms_ssim_db: float
    psnr: float
    encode_s: float
    decode_s: float
    probes: int  # encodes the search made

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Probe:
    setting: float
    data: bytes
    bpp: float
    encode_s: float


def _dist(bpp: float, target: float) -> float:
    return abs(math.log(max(bpp, 1e-12) / target))


def search(encode: Callable[[float], Probe], space: Space, target: float, max_probes: int = MAX_PROBES,
           tol: float = TOL, on_probe: Callable[[Probe], None] | None = None) -> tuple[Probe, int]:
    """The probe (knob setting and its file) nearest ``target`` bpp, and how many encodes it took.

    ``encode(setting)`` codes the image; bpp is assumed monotone in the knob (``space.grows``)."""
    tried: dict[float, Probe] = {}
    fwd = (lambda x: math.log(x)) if space.log else (lambda x: x)
    inv = (lambda u: math.exp(u)) if space.log else (lambda u: u)

    def clamp(x: float) -> float:
        x = min(max(x, space.lo), space.hi)
        return float(round(x)) if space.integer else float(f"{x:.3g}")  # 3 significant digits: 6.49, 96.3

    def probe(x: float) -> Probe:
        if x not in tried:
            tried[x] = encode(x)
            if on_probe:
                on_probe(tried[x])
        return tried[x]

    x = clamp(space.guess(target))
    step = 16.0 if not space.log else math.log(2.0)
    while True:
        p = probe(x)
        if _dist(p.bpp, target) < tol or len(tried) >= max_probes:
            break
        below = sorted((q for q in tried.values() if q.bpp < target), key=lambda q: _dist(q.bpp, target))
        above = sorted((q for q in tried.values() if q.bpp >= target), key=lambda q: _dist(q.bpp, target))
        if below and above:  # bracketed: interpolate in (knob, log bpp), kept strictly inside the bracket
            a, b = below[0], above[0]
            ua, ub = fwd(a.setting), fwd(b.setting)
            la, lb = math.log(max(a.bpp, 1e-12)), math.log(b.bpp)
            u = ua + (ub - ua) * (math.log(target) - la) / (lb - la) if lb > la else (ua + ub) / 2
            lo_u, hi_u = min(ua, ub), max(ua, ub)
            margin = 0.1 * (hi_u - lo_u)
            u = min(max(u, lo_u + margin), hi_u - margin)
            nxt = clamp(inv(u))
            if space.integer and nxt in (a.setting, b.setting):
                between = [v for v in range(int(min(a.setting, b.setting)) + 1, int(max(a.setting, b.setting)))]
                if not between:
                    break  # adjacent settings: nothing in between
                nxt = float(between[len(between) // 2])
            if nxt in tried:
                break
            x = nxt
            continue
        # not bracketed yet: step towards the target, doubling the step, until the knob's end
        up = (p.bpp < target) == space.grows
        nxt = clamp(inv(fwd(x) + (step if up else -step)))
        step *= 2
        if nxt == x or nxt in tried:
            break  # at the end of the knob's range: the target is out of this codec's reach
        x = nxt
    best = min(tried.values(), key=lambda q: _dist(q.bpp, target))
    return best, len(tried)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def code_classical(codec: C.Codec, img: np.ndarray, target: float, bar=None) -> tuple[Probe, np.ndarray, float, int]:
    """(chosen probe, its decoded image, decode seconds, encodes made) of one classical codec."""
    h, w = img.shape[:2]
    space = SEARCH.get(codec.name)

    def encode(x: float) -> Probe:
        value = int(x) if codec.setting_type is int else float(x)
        data, seconds = _timed(codec.encode, img, value)
        return Probe(float(x), data, bits_per_pixel(len(data), h, w), seconds)

    def note(p: Probe) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{codec.setting} {p.setting:g}: {p.bpp:.3f} bpp")

    if space is None:  # a codec without a declared knob range: the nearest of its default sweep
        probes = []
        for s in codec.default_sweep or ():
            probes.append(encode(float(s)))
            note(probes[-1])
        if not probes:
            raise PipelineError(f"{codec.name}: no quality knob to search (add it to compare.SEARCH)")
        best, n = min(probes, key=lambda q: _dist(q.bpp, target)), len(probes)
    else:
        best, n = search(encode, space, target, on_probe=note)
    decoded, seconds = _timed(codec.decode, best.data)
    return best, decoded, seconds, n


def code_rnn(codec: C.RNN, img: np.ndarray, target: float, bar=None) -> tuple[Probe, np.ndarray, float, int]:
    """The iteration count whose file is nearest ``target``: encodes with more iterations until the full file
    reaches the target (or the model's most), reads each lower count from the truncated file, then encodes the
    chosen count on its own when it was not the last encoded (its own encode time)."""
    h, w = img.shape[:2]
    top = int(codec.codec.max_iterations)
    raw = 0.125 * codec.codec.bits / 32  # bpp of one raw iteration (32 bits per 16x16 block: 0.125)
    k = max(1, min(top, round(target / raw)))
    timed: dict[int, float] = {}
    sizes: dict[int, bytes] = {}
    encodes = 0
    while True:
        data, seconds = _timed(codec.encode, img, k)
        encodes += 1
        timed[k] = seconds
        for j in range(1, k + 1):
            sizes[j] = data if j == k else bytes(codec._truncate(data, j))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{k} iterations: {bits_per_pixel(len(data), h, w):.3f} bpp")
        if bits_per_pixel(len(data), h, w) >= target or k >= top:
            break
        k += 1
    best = min(sizes, key=lambda j: _dist(bits_per_pixel(len(sizes[j]), h, w), target))
    if best not in timed:
        data, seconds = _timed(codec.encode, img, best)
        encodes += 1
        if data != sizes[best]:
            raise PipelineError(f"rnn: the {best}-iteration file differs from the truncated {k}-iteration file")
        timed[best] = seconds
    data = sizes[best]
    decoded, dec_s = _timed(codec.decode, data)
    return Probe(float(best), data, bits_per_pixel(len(data), h, w), timed[best]), decoded, dec_s, encodes


def build_codecs(names: list[str] | None, model: str | None, device: str = "cpu",
                 rnn_loader=None) -> tuple[list[C.Codec], dict[str, str]]:
    """The codecs to compare (registry order), each with its fixed settings at their params.yaml defaults;
    and {name: why skipped} for those not usable here."""
    names = list(C.REGISTRY) if not names else names
    unknown = [n for n in names if n not in C.REGISTRY]
    if unknown:
        raise PipelineError(f"--codecs: unknown codec {unknown[0]!r} (known: {', '.join(C.REGISTRY)})")
    codecs, skipped = [], {}
    for name in names:
        cls = C.REGISTRY[name]
        if name == "rnn":
            if rnn_loader is None:  # the codec's own progress bar over the tiles of a large photo
                from pipeline.compression.codec import load_codec

                codec = C.RNN(load_codec(model, device=device, show_progress=True), None)
            else:
                codec = C.RNN(rnn_loader(model, device=device), None)
        else:
            codec = cls([], **{arg: knob.default for arg, knob in cls.knobs.items()})
        why = codec.available()
        if why:
            skipped[name] = why
        else:
            codecs.append(codec)
    if not codecs:
        raise PipelineError("compare: no usable codec")
    return codecs, skipped


def compare(img: np.ndarray, codecs: list[C.Codec], target: float, device: str = "cpu",
            show_progress: bool = True) -> tuple[list[Result], dict[str, np.ndarray]]:
    """Every codec on ``img`` at its setting nearest ``target`` bpp: the results and the decoded images."""
    from pipeline.evaluation.metrics import Reference
    from pipeline.utils import progress

    try:
        ref = Reference(img, device)
    except ValueError as err:
        raise PipelineError(f"{err}: too small to score with 5-scale MS-SSIM") from None
    results, decoded = [], {}
    for codec in codecs:
        bar = progress(total=MAX_PROBES if codec.name != "rnn" else None, desc=f"{codec.name:>8}", unit="enc",
                       leave=False, **({} if show_progress else {"disable": True}))
        try:
            fn = code_rnn if isinstance(codec, C.RNN) else code_classical
            probe, out, dec_s, n = fn(codec, img, target, bar)
        finally:
            bar.close()
        q = ref.compare(np.ascontiguousarray(out, dtype=np.uint8))
        results.append(Result(codec=codec.name, label=codec.label, setting_name=codec.setting, setting=probe.setting,
                              bytes=len(probe.data), bpp=probe.bpp, ms_ssim=q.ms_ssim, ms_ssim_db=q.ms_ssim_db,
                              psnr=q.psnr, encode_s=probe.encode_s, decode_s=dec_s, probes=n))
        decoded[codec.name] = out
    return results, decoded


# ----------------------------------------------------------------------------- the table, picture and page

def table(results: list[Result]) -> str:
    head = f"{'codec':<11} {'setting':<16} {'bpp':>7} {'MS-SSIM':>8} {'PSNR dB':>8} {'encode s':>9} {'decode s':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        setting = f"{r.setting_name} {r.setting:g}"
        lines.append(f"{r.label:<11} {setting:<16} {r.bpp:7.4f} {r.ms_ssim:8.4f} {r.psnr:8.2f} {r.encode_s:9.3f} "
                     f"{r.decode_s:9.3f}")
    return "\n".join(lines)


def detail_box(img: np.ndarray, side: int) -> tuple[int, int, int]:
    """(left, top, side): the ``side`` px square with the most detail (gradient energy), where coding
    artefacts show; found on a coarse grid."""
    h, w = img.shape[:2]
    side = min(side, h, w)
    f = max(1, min(h, w) // 256)
    grey = img[::f, ::f].astype(np.float32).mean(2)
    energy = np.zeros_like(grey)
    energy[:, 1:] += np.abs(np.diff(grey, axis=1))
    energy[1:, :] += np.abs(np.diff(grey, axis=0))
    s = max(1, side // f)
    ii = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return min(int(x) * f, w - side), min(int(y) * f, h - side), side


PANEL = 480  # px: width of each codec's column in the picture
GAP = 8
CAPTION = 40  # px: two lines of text above each panel
COLUMNS = 4


def layout(h: int, w: int, panels: int) -> dict[str, int]:
    """Sizes of the side-by-side picture: per panel the full view (``PANEL`` wide) and the zoomed crop
    (``PANEL`` square), ``COLUMNS`` panels a row."""
    full_h = max(1, round(h * PANEL / w))
    cols = min(COLUMNS, panels)
    rows = -(-panels // cols)
    cell_h = CAPTION + full_h + GAP + PANEL
    return {"full_h": full_h, "cols": cols, "rows": rows, "cell_h": cell_h,
            "width": GAP + cols * (PANEL + GAP), "height": GAP + rows * (cell_h + GAP)}


def picture(original: np.ndarray, results: list[Result], decoded: dict[str, np.ndarray],
            box: tuple[int, int, int]):
    """The side-by-side picture (a PIL image): the original first, then each codec."""
    from PIL import Image, ImageDraw

    h, w = original.shape[:2]
    left, top, side = box
    panels = [("original", f"{w}x{h}, {w * h / 1e6:.1f} MP", original)]
    panels += [(f"{r.label}: {r.setting_name} {r.setting:g}",
                f"{r.bpp:.3f} bpp  MS-SSIM {r.ms_ssim:.4f}  {r.psnr:.2f} dB", decoded[r.codec]) for r in results]
    L = layout(h, w, len(panels))
    canvas = Image.new("RGB", (L["width"], L["height"]), "white")
    draw = ImageDraw.Draw(canvas)
    scale = PANEL / w
    for i, (title, sub, img) in enumerate(panels):
        x0 = GAP + (i % L["cols"]) * (PANEL + GAP)
        y0 = GAP + (i // L["cols"]) * (L["cell_h"] + GAP)
        draw.text((x0, y0 + 2), title, fill="black")
        draw.text((x0, y0 + 20), sub, fill=(60, 60, 60))
        full = Image.fromarray(img).resize((PANEL, L["full_h"]), Image.Resampling.LANCZOS)
        canvas.paste(full, (x0, y0 + CAPTION))
        bx, by = x0 + left * scale, y0 + CAPTION + top * scale
        draw.rectangle([bx, by, bx + max(2, side * scale), by + max(2, side * scale)], outline="red", width=2)
        crop = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
        canvas.paste(crop.resize((PANEL, PANEL), Image.Resampling.NEAREST), (x0, y0 + CAPTION + L["full_h"] + GAP))
    return canvas


def page(photo: str, size: tuple[int, int], target: float, results: list[Result], skipped: dict[str, str],
         png_name: str, box: tuple[int, int, int]) -> str:
    w, h = size
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(r.label)}</td><td>{e(r.setting_name)} {r.setting:g}</td><td>{r.bytes}</td><td>{r.bpp:.4f}</td>"
        f"<td>{r.ms_ssim:.4f}</td><td>{r.ms_ssim_db:.2f}</td><td>{r.psnr:.2f}</td><td>{r.encode_s:.3f}</td>"
        f"<td>{r.decode_s:.3f}</td><td>{r.probes}</td></tr>" for r in results)
    skip = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in skipped.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(Path(photo).name)} at {target:g} bpp</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}
img{{max-width:100%}}</style></head><body>
<h1>{e(Path(photo).name)}: every codec at about {target:g} bpp</h1>
<p>{w}x{h} px ({w * h / 1e6:.1f} MP). Each codec at the setting of its quality knob whose real file (headers
included) is nearest {target:g} bpp; MS-SSIM is the 5-scale metric (RGB, data range 255), PSNR over RGB.
Times: one encode and one decode of the chosen file on this machine. Zoomed region: {box[2]}x{box[2]} px at
left {box[0]}, top {box[1]} (red box).</p>
<table><tr><th>codec</th><th>setting</th><th>bytes</th><th>bpp</th><th>MS-SSIM</th><th>MS-SSIM dB</th>
<th>PSNR dB</th><th>encode s</th><th>decode s</th><th>encodes searched</th></tr>
{rows}
</table>
{f"<p>Skipped:</p><ul>{skip}</ul>" if skip else ""}
<p><img src="{e(png_name)}" alt="side by side"></p>
</body></html>
"""


def outputs(out: Path, photo: str) -> dict[str, Path]:
    stem = Path(photo).stem
    return {kind: out / f"{stem}.compare.{kind}" for kind in ("png", "html", "json")}


def check_outputs(out: Path, photo: str, overwrite: bool) -> dict[str, Path]:
    """The files the command will write; refuses (before any work) an output folder that is a file, or an
    existing output file unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out}: is a file, not a folder")
    files = outputs(out, photo)
    if not overwrite:
        there = [str(p) for p in files.values() if p.exists()]
        if there:
            raise PipelineError(f"{there[0]} exists; remove it, choose another --out, or pass --overwrite")
    return files


def write(files: dict[str, Path], photo: str, img: np.ndarray, target: float, results: list[Result],
          decoded: dict[str, np.ndarray], skipped: dict[str, str], box: tuple[int, int, int] | None = None) -> None:
    from pipeline.utils import atomic_path, atomic_write_text

    h, w = img.shape[:2]
    box = box or detail_box(img, min(256, h, w))
    pic = picture(img, results, decoded, box)
    next(iter(files.values())).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(files["png"]) as tmp:
        pic.save(tmp, format="PNG")
    atomic_write_text(files["html"], page(photo, (w, h), target, results, skipped, files["png"].name, box))
    atomic_write_text(files["json"], json.dumps(
        {"photo": str(photo), "width": w, "height": h, "target_bpp": target, "zoom": list(box),
         "results": [r.row() for r in results], "skipped": skipped}, indent=2) + "\n")
