"""Stage ``evaluate``: every codec on Kodak, at every setting of its sweep, through real files.

Per image and setting: file size -> bpp = 8 N / (H W); MS-SSIM (5 scales), MS-SSIM dB, SSIM
(single scale), PSNR; encode and decode time. Then curves averaged over images per setting,
values interpolated at fixed rates, Bjontegaard deltas, figures, and a visual comparison crop.

Outputs (``data/evaluation/``, written atomically): per_image.csv, curves.csv, at_rates.csv,
bd.csv, summary.json, metrics.json, curves/<codec>.csv, figures/*.png, visual/*.png + visual.json.
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.evaluation import bdrate
from pipeline.evaluation.codecs import Codec, bpp, build, load_rnn
from pipeline.evaluation.metrics import Reference

KODAK_DIR = Path("data/raw/kodak")
OUT_DIR = Path("data/evaluation")
QUALITIES = ("ms_ssim", "ms_ssim_db", "psnr", "ssim")  # averaged per setting
BD_METRICS = ("ms_ssim_db", "psnr")  # Bjontegaard deltas are taken on these (dB scales)
LABELS = {"ms_ssim": "MS-SSIM", "ms_ssim_db": "MS-SSIM (dB)", "psnr": "PSNR (dB)", "ssim": "SSIM (single-scale)"}


@dataclass
class Row:
    image: str
    codec: str
    setting_name: str
    setting: float
    bytes: int
    height: int
    width: int
    bpp: float
    ms_ssim: float
    ms_ssim_db: float
    psnr: float
    ssim: float
    encode_s: float
    decode_s: float


# ----------------------------------------------------------------------------- inputs

def kodak_paths(root: Path, indices: list[int] | None) -> list[Path]:
    if indices is None:
        paths = sorted(p for p in root.glob("kodim*.png") if re.fullmatch(r"kodim\d\d\.png", p.name))
    else:
        paths = [root / f"kodim{i:02d}.png" for i in indices]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise PipelineError(f"{root}: missing {', '.join(missing)} (run the download stage)")
    if not paths:
        raise PipelineError(f"{root}: no kodimNN.png images (run the download stage)")
    return paths


def load_image(path: Path, crop: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise PipelineError(f"{path}: not a readable image ({err})") from None
    if crop is not None:
        h, w = img.shape[:2]
        if crop > min(h, w):
            raise PipelineError(f"evaluate.crop={crop} is larger than {path.name} ({w}x{h})")
        top, left = (h - crop) // 2, (w - crop) // 2
        img = img[top:top + crop, left:left + crop]
    return np.ascontiguousarray(img)


# ----------------------------------------------------------------------------- measuring

def measure(codec: Codec, setting: Any, image: str, img: np.ndarray, ref: Reference) -> tuple[Row, np.ndarray]:
    t0 = time.perf_counter()
    data = codec.encode(img, setting)
    t1 = time.perf_counter()
    decoded = codec.decode(data)
    t2 = time.perf_counter()
    if decoded.shape != img.shape or decoded.dtype != np.uint8:
        raise PipelineError(f"{codec.name} at {codec.setting}={setting}: decoded {decoded.dtype} {decoded.shape}, "
                            f"expected uint8 {img.shape}")
    h, w = img.shape[:2]
    q = ref.compare(decoded)
    row = Row(image=image, codec=codec.name, setting_name=codec.setting, setting=float(setting),
              bytes=len(data), height=h, width=w, bpp=bpp(len(data), h, w), ms_ssim=q.ms_ssim,
              ms_ssim_db=q.ms_ssim_db, psnr=q.psnr, ssim=q.ssim, encode_s=t1 - t0, decode_s=t2 - t1)
    return row, decoded


def run_sweeps(paths: list[Path], codecs: list[Codec], *, crop: int | None, device, visual_image: str | None,
               visual_bpp: float):
    """Run every codec over every image; return the rows and the visual picks {codec: (row, decoded)}."""
    from pipeline.utils import progress

    rows: list[Row] = []
    picks: dict[str, tuple[Row, np.ndarray]] = {}
    original = None
    total = len(paths) * sum(len(c.settings) for c in codecs)
    bar = progress(total=total, desc="evaluate", unit="enc")
    try:
        for path in paths:
            img = load_image(path, crop)
            try:
                ref = Reference(img, device)
            except ValueError as err:
                raise PipelineError(f"{path.name}: {err} (evaluate.crop)") from None
            name = path.stem
            if name == visual_image:
                original = img
            for codec in codecs:
                for setting in codec.settings:
                    bar.set_postfix_str(f"{name} {codec.name} {codec.setting}={setting}")
                    row, decoded = measure(codec, setting, name, img, ref)
                    rows.append(row)
                    if name == visual_image:
                        best = picks.get(codec.name)
                        dist = abs(math.log(max(row.bpp, 1e-9) / visual_bpp))
                        if best is None or dist < abs(math.log(max(best[0].bpp, 1e-9) / visual_bpp)):
                            picks[codec.name] = (row, decoded)
                    bar.update(1)
    finally:
        bar.close()
    return rows, picks, original


# ----------------------------------------------------------------------------- summarising

def average_curves(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """One point per (codec, setting): the mean over images of bpp, qualities and times."""
    groups: dict[tuple[str, float], list[Row]] = {}
    order: list[tuple[str, float]] = []
    for r in rows:
        key = (r.codec, r.setting)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)
    curves = []
    for codec, setting in order:
        g = groups[(codec, setting)]
        point = {"codec": codec, "setting_name": g[0].setting_name, "setting": setting, "images": len(g)}
        for field in ("bpp", *QUALITIES, "encode_s", "decode_s"):
            point[field] = float(np.mean([getattr(r, field) for r in g]))
        curves.append(point)
    curves.sort(key=lambda p: (p["codec"], p["bpp"]))
    return curves


def by_codec(curves: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in curves:
        out.setdefault(p["codec"], []).append(p)
    return out


def at_rates(curves: list[dict[str, Any]], rates: list[float], slack: float = 0.0) -> list[dict[str, Any]]:
    """Each codec's averaged curve interpolated (linearly in log bpp) at ``rates``; NaN outside its range."""
    out = []
    for codec, pts in by_codec(curves).items():
        x = [p["bpp"] for p in pts]
        values = {q: bdrate.interpolate(x, [p[q] for p in pts], rates, slack) for q in QUALITIES}
        for i, rate in enumerate(rates):
            out.append({"codec": codec, "bpp": rate, **{q: float(values[q][i]) for q in QUALITIES}})
    return out


def bd_pairs(names: list[str], anchor: str, ours: str = "rnn") -> list[tuple[str, str]]:
    """(anchor, test): every codec against ``anchor``, and ``ours`` against every codec."""
    pairs = [(anchor, n) for n in names if n != anchor and anchor in names]
    if ours in names:
        pairs += [(n, ours) for n in names if n != ours and (n, ours) not in pairs]
    return pairs


def bd_table(curves: list[dict[str, Any]], anchor: str, method: str) -> list[dict[str, Any]]:
    per = by_codec(curves)
    rows = []
    for a, t in bd_pairs(list(per), anchor):
        for metric in BD_METRICS:
            ra, qa = [p["bpp"] for p in per[a]], [p[metric] for p in per[a]]
            rt, qt = [p["bpp"] for p in per[t]], [p[metric] for p in per[t]]
            rows.append({"anchor": a, "test": t, "metric": metric, "method": method,
                         "bd_rate_pct": bdrate.bd_rate(ra, qa, rt, qt, method),
                         "bd_quality_db": bdrate.bd_quality(ra, qa, rt, qt, method)})
    return rows


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def rate_key(rate: float) -> str:
    return f"bpp_{rate:g}"


def metrics_json(points: list[dict[str, Any]], bd: list[dict[str, Any]], anchor: str, n_images: int,
                 duration_s: float) -> dict[str, Any]:
    """What ``dvc metrics show`` lists: qualities at the fixed rates per codec, and the BD-rates."""
    out: dict[str, Any] = {"images": n_images, "duration_s": round(duration_s, 2)}
    for q in ("ms_ssim", "ms_ssim_db", "psnr"):
        out[q] = {}
        for p in points:
            out[q].setdefault(p["codec"], {})[rate_key(p["bpp"])] = _num(p[q])
    out[f"bd_rate_vs_{anchor}"] = {r["test"]: {} for r in bd if r["anchor"] == anchor}
    out["bd_rate_rnn_vs"] = {r["anchor"]: {} for r in bd if r["test"] == "rnn"}
    for r in bd:
        if r["anchor"] == anchor:
            out[f"bd_rate_vs_{anchor}"][r["test"]][r["metric"]] = _num(r["bd_rate_pct"])
        if r["test"] == "rnn":
            out["bd_rate_rnn_vs"][r["anchor"]][r["metric"]] = _num(r["bd_rate_pct"])
    return out


# ----------------------------------------------------------------------------- writing

def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Read one of our CSVs back, numbers as floats (empty/nan cells -> NaN)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v) if v != "" else float("nan")
                except ValueError:
                    row[k] = v
            out.append(row)
    return out


COLORS = {"jpeg": "tab:blue", "jpeg2000": "tab:orange", "webp": "tab:green", "avif": "tab:purple",
          "jpegxl": "tab:brown", "rnn": "tab:red"}


def plot_curves(curves: list[dict[str, Any]], quality: str, path: Path, labels: dict[str, str],
                max_bpp: float, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for codec, pts in by_codec(curves).items():
        ax.plot([p["bpp"] for p in pts], [p[quality] for p in pts], marker="o", ms=3.5,
                lw=2.2 if codec == "rnn" else 1.4, color=COLORS.get(codec), label=labels.get(codec, codec))
    ax.set_xlim(0, max_bpp)
    ax.set_xlabel("bits per pixel (bpp, from file size)")
    ax.set_ylabel(LABELS[quality])
    ax.set_title(title or f"{LABELS[quality]} vs bpp (Kodak, mean over images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


FIGURES = {"ms_ssim": "ms_ssim_vs_bpp.png", "ms_ssim_db": "ms_ssim_db_vs_bpp.png",
           "psnr": "psnr_vs_bpp.png", "ssim": "ssim_vs_bpp.png"}


def write_visual(out: Path, original: np.ndarray, picks: dict[str, tuple[Row, np.ndarray]],
                 box: list[int], image: str, target: float) -> dict[str, Any]:
    h, w = original.shape[:2]
    left, top, cw, ch = box
    left, top = min(left, max(0, w - 8)), min(top, max(0, h - 8))
    cw, ch = min(cw, w - left), min(ch, h - top)
    sl = (slice(top, top + ch), slice(left, left + cw))
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(original[sl]).save(out / "original.png")
    entries = {}
    for codec, (row, decoded) in picks.items():
        Image.fromarray(np.ascontiguousarray(decoded[sl])).save(out / f"{codec}.png")
        entries[codec] = {"file": f"{codec}.png", "setting_name": row.setting_name, "setting": row.setting,
                          "bpp": row.bpp, "ms_ssim": row.ms_ssim, "psnr": row.psnr, "ssim": row.ssim}
    return {"image": image, "target_bpp": target, "crop": [left, top, cw, ch], "original": "original.png",
            "codecs": entries}


def write_outputs(out: Path, rows: list[Row], curves, points, bd, metrics, summary, picks, original,
                  params) -> None:
    from pipeline.utils import save_json

    labels = summary["labels"]
    write_csv(out / "per_image.csv", [asdict(r) for r in rows])
    write_csv(out / "curves.csv", curves)
    write_csv(out / "at_rates.csv", points)
    write_csv(out / "bd.csv", bd)
    for codec, pts in by_codec(curves).items():
        write_csv(out / "curves" / f"{codec}.csv",
                  [{k: p[k] for k in ("setting", "bpp", *QUALITIES)} for p in pts])
    for quality, name in FIGURES.items():
        plot_curves(curves, quality, out / "figures" / name, labels, params.plot_max_bpp)
    if original is not None and picks:
        visual = write_visual(out / "visual", original, picks, params.visual_crop, summary["visual_image"],
                              params.visual_bpp)
        save_json(out / "visual" / "visual.json", visual)
    save_json(out / "summary.json", summary)
    save_json(out / "metrics.json", metrics)


# ----------------------------------------------------------------------------- stage

def evaluate(params, out_dir: Path = OUT_DIR, kodak_dir: Path = KODAK_DIR, rnn_loader=None) -> dict[str, Any]:
    """Run the whole evaluation for ``params`` (full Params) and write ``out_dir``; returns metrics.

    ``rnn_loader(model, device)`` returns the RNN codec object (default: ``load_rnn``).
    """
    import platform

    import torch

    from pipeline.utils import atomic_path, log, select_device

    p = params.evaluate
    start = time.perf_counter()
    paths = kodak_paths(Path(kodak_dir), p.images)
    device = select_device(p.device)
    if device.type == "cpu" and p.cpu_threads:
        torch.set_num_threads(p.cpu_threads)
    if "rnn" in p.codecs and not re.match(r"^[a-z]+:/", p.rnn_model) and not Path(p.rnn_model).exists():
        raise PipelineError(f"{p.rnn_model}: RNN codec checkpoint not found (run train_compressor, "
                            "or drop 'rnn' from evaluate.codecs)")
    codecs, skipped = build(p, device=str(device), rnn_loader=rnn_loader or load_rnn)
    for name, why in skipped.items():
        log(f"[evaluate] skipping {name}: {why}")
    if not codecs:
        raise PipelineError("evaluate: no usable codec")
    names = [c.name for c in codecs]
    anchor = p.anchor if p.anchor in names else names[0]
    visual_image = f"kodim{p.visual_image:02d}"
    if visual_image not in [q.stem for q in paths]:
        log(f"[evaluate] visual_image {visual_image} is not evaluated: using {paths[0].stem}")
        visual_image = paths[0].stem
    log(f"[evaluate] {len(paths)} image(s), codecs {', '.join(names)} on {device}")

    rows, picks, original = run_sweeps(paths, codecs, crop=p.crop, device=device, visual_image=visual_image,
                                       visual_bpp=p.visual_bpp)
    curves = average_curves(rows)
    points = at_rates(curves, p.rates, p.rate_slack)
    bd = bd_table(curves, anchor, p.bd_method)
    duration = time.perf_counter() - start
    metrics = metrics_json(points, bd, anchor, len(paths), duration)
    summary = {
        "profile": params.profile, "images": [q.stem for q in paths], "crop": p.crop,
        "all_kodak": p.images is None and p.crop is None and len(paths) == 24,
        "codecs": {c.name: {"label": c.label, "description": c.describe(), "setting": c.setting,
                            "settings": [float(s) for s in c.settings]} for c in codecs},
        "labels": {c.name: c.label for c in codecs}, "skipped": skipped, "anchor": anchor,
        "bd_method": p.bd_method, "rates": p.rates, "visual_image": visual_image, "device": str(device),
        "torch": torch.__version__, "platform": platform.platform(), "duration_s": duration,
        "encodes": len(rows),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_outputs(tmp, rows, curves, points, bd, metrics, summary, picks, original, p)
    log(f"[evaluate] {len(rows)} encodes in {duration:.1f} s -> {out_dir}")
    return metrics


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def main() -> None:
    import mlflow

    from pipeline import tracking
    from pipeline.config import load_params
    from pipeline.utils import seed_everything

    params = load_params()
    seed_everything(params.seed)
    with tracking.stage_run("evaluate", params):
        metrics = evaluate(params)
        mlflow.log_metrics(_flat(metrics))
        curves = read_csv(OUT_DIR / "curves.csv")
        for codec, pts in by_codec(curves).items():  # each curve as a stepped metric (step = sweep index)
            for i, pt in enumerate(pts):
                mlflow.log_metrics({f"curve.{codec}.bpp": pt["bpp"], f"curve.{codec}.ms_ssim": pt["ms_ssim"],
                                    f"curve.{codec}.psnr": pt["psnr"]}, step=i)
        mlflow.log_artifacts(str(OUT_DIR), artifact_path="evaluation")
