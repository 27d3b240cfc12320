"""Stage ``evaluate``: every codec on an image set, at every setting of its sweep, through real files.

The set is ``evaluate.dataset`` (``pipeline.evaluation.datasets``): ``kodak``, ``images`` (your own
photos in data/images) or the public set named by ``data.test_photos``; each of ``evaluate.extra_datasets``
is coded the same way and gets its own headline tables (``sets/<name>/``).

Per image and setting: file size -> bpp = 8 N / (H W); MS-SSIM (5 scales), MS-SSIM dB, SSIM
(single scale), PSNR; encode and decode time. The RNN codec is encoded once per image at its largest
iteration count; the lower counts are truncations of that progressive file (bpp from their sizes).

Quality at a rate, primary convention (``stats``): each image's own curve interpolated (PCHIP in
log-bpp, no extrapolation) at the report's rates, then averaged over the images that reach the rate,
with a bootstrap 95 % interval and the count of images; every pair of codecs compared per image
(wins, mean difference, interval); BD-rates per image (median, interval). Secondary convention:
curves averaged over images per setting (``curves.csv``), interpolated the same way, and BD-rates
on those averaged curves.

Outputs (``data/evaluation/``, written atomically): per_image.csv, per_image_at.csv, curves.csv,
at_rates.csv (primary), at_rates_avg.csv (secondary), pairwise.csv, bd.csv, bd_per_image.csv,
summary.json, metrics.json, curves/<codec>.csv, figures/*.png, visual/*.png + visual.json, and per extra set
sets/<name>/ (per_image.csv, at_rates.csv, pairwise.csv, bd.csv, set.json); sets/ is empty without one.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.evaluation import stats
from pipeline.evaluation.codecs import Codec, build, load_rnn
from pipeline.evaluation.datasets import KODAK, ImageSet, describe_sizes, folder_of, kodak_paths, open_set  # noqa: F401
from pipeline.evaluation.datasets import load as load_image
from pipeline.evaluation.figures import AT_RATE_FIGURES, FIGURES, plot_at_rate, plot_curves
from pipeline.evaluation.metrics import Reference
from pipeline.evaluation.summarise import at_rates, average_curves, bd_per_image_table, bd_table, metrics_json
from pipeline.images import bits_per_pixel
from pipeline.records import (QUALITIES, AtRate, AtRateAvg, BDRate, CodecSummary, CurvePoint,  # noqa: F401 - read_csv
                              EvaluationSummary, Measurement, Pairwise, by_codec, read_csv, read_table, write_csv,
                              write_table)

STAGE = "evaluate"
#: the stage's input and output folders (pipeline/stage.py); dvc.yaml's cmd gives them: the three image
#: sets' folders (``evaluate.dataset`` names one of them) and the output. The RNN codec's checkpoint is
#: ``evaluate.rnn_model`` (a path or an MLflow model URI).
PATHS = ("kodak", "images", "test_photos", "out")
SECTIONS = ("evaluate",)  # and data.test_photos: the name of the downloaded public set
COMPARED = ("ms_ssim", "psnr")  # pairwise comparisons at a rate are made on these


# ----------------------------------------------------------------------------- measuring

def row_of(codec: Codec, coded, image: str, img: np.ndarray, ref: Reference) -> Measurement:
    """One measured point: the real file's size and the decoded image's quality."""
    decoded = coded.decoded
    if decoded.shape != img.shape or decoded.dtype != np.uint8:
        raise PipelineError(f"{codec.name} at {codec.setting}={coded.setting:g}: decoded {decoded.dtype} "
                            f"{decoded.shape}, expected uint8 {img.shape}")
    h, w = img.shape[:2]
    q = ref.compare(decoded)
    return Measurement(image=image, codec=codec.name, setting_name=codec.setting, setting=float(coded.setting),
               bytes=len(coded.data), height=h, width=w, bpp=bits_per_pixel(len(coded.data), h, w), ms_ssim=q.ms_ssim,
               ms_ssim_db=q.ms_ssim_db, psnr=q.psnr, ssim=q.ssim, encode_s=coded.encode_s, decode_s=coded.decode_s)


def run_sweeps(images: ImageSet, codecs: list[Codec], *, device, visual_image: str | None,
               visual_bpp: float, only: dict[str, set[str]] | None = None):
    """Run every codec over every image of the set (``only``: {codec: image names} restricts a codec to a subset).

    Returns the rows, the visual picks {codec: (row, decoded)}, the visual original and the wall time
    spent per codec (coding and metrics).
    """
    from pipeline.utils import progress

    only = only or {}
    rows: list[Measurement] = []
    picks: dict[str, tuple[Measurement, np.ndarray]] = {}
    seconds = {c.name: 0.0 for c in codecs}
    original = None
    total = sum(len(c.settings) for n in images.names for c in codecs if c.name not in only or n in only[c.name])
    bar = progress(total=total, desc=f"evaluate {images.name}", unit="enc")
    try:
        for path, name in zip(images.paths, images.names):
            img = load_image(path, images.crop)
            try:
                ref = Reference(img, device)
            except ValueError as err:
                raise PipelineError(f"{path}: {err} (evaluate.crop)") from None
            if name == visual_image:
                original = img
            for codec in codecs:
                if codec.name in only and name not in only[codec.name]:
                    continue
                bar.set_postfix_str(f"{name} {codec.name}")
                t0 = time.perf_counter()
                for coded in codec.sweep(img):
                    row = row_of(codec, coded, name, img, ref)
                    rows.append(row)
                    if name == visual_image:
                        best = picks.get(codec.name)
                        dist = abs(math.log(max(row.bpp, 1e-9) / visual_bpp))
                        if best is None or dist < abs(math.log(max(best[0].bpp, 1e-9) / visual_bpp)):
                            picks[codec.name] = (row, coded.decoded)
                    bar.update(1)
                seconds[codec.name] += time.perf_counter() - t0
    finally:
        bar.close()
    return rows, picks, original, seconds


# ----------------------------------------------------------------------------- writing
# (the tables: summarise.py; the figures: figures.py)

def write_visual(out: Path, original: np.ndarray, picks: dict[str, tuple[Measurement, np.ndarray]],
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


def write_outputs(out: Path, rows: list[Measurement], curves, points, bd, metrics, summary: EvaluationSummary, picks,
                  original, params, *, extra: dict[str, list[dict[str, Any]]], records: dict[str, list[Any]],
                  img_curves, images_of) -> None:
    from pipeline.utils import save_json

    labels = summary.labels
    write_table(out / "per_image.csv", rows)
    write_table(out / "curves.csv", curves)
    write_table(out / "at_rates.csv", [AtRate(**p) for p in points])
    write_table(out / "bd.csv", [BDRate(**r) for r in bd])
    for name, table in extra.items():
        write_csv(out / name, table)
    for name, table in records.items():
        write_table(out / name, table)
    for codec, pts in by_codec(curves).items():
        write_csv(out / "curves" / f"{codec}.csv",
                  [{k: getattr(p, k) for k in ("setting", "bpp", *QUALITIES)} for p in pts])
    for quality, name in FIGURES.items():
        plot_curves(curves, quality, out / "figures" / name, labels, params.plot_max_bpp)
    for quality, name in AT_RATE_FIGURES.items():
        plot_at_rate(img_curves, points, quality, out / "figures" / name, labels, images_of, params.plot_max_bpp,
                     params.rate_slack)
    if original is not None and picks:
        visual = write_visual(out / "visual", original, picks, params.visual_crop, summary.visual_image,
                              params.visual_bpp)
        save_json(out / "visual" / "visual.json", visual)
    save_json(out / "summary.json", summary.model_dump())
    save_json(out / "metrics.json", metrics)


# ----------------------------------------------------------------------------- stage

def open_sets(params, folders: dict[str, Path]) -> list[ImageSet]:
    """``evaluate.dataset`` and ``evaluate.extra_datasets``, every image checked (one error naming a bad one)."""
    from pipeline.utils import log

    p = params.evaluate
    test_photos = getattr(params.data, "test_photos", None)
    sets = []
    for name in [p.dataset, *p.extra_datasets]:
        if name != KODAK and (p.images is not None or p.rnn_images is not None) and name == p.dataset:
            log(f"[evaluate] {name}: evaluate.images and rnn_images are Kodak indices; ignored for this set")
        folder = folder_of(name, folders, test_photos)
        found = open_set(name, folder, kodak_indices=p.images if name == KODAK else None, limit=p.limit, crop=p.crop)
        if found.ignored:
            log(f"[evaluate] {name}: {len(found.ignored)} file(s) in {folder} are not images, left alone: "
                + ", ".join(found.ignored[:5]) + (" ..." if len(found.ignored) > 5 else ""))
        log(f"[evaluate] image set {found.describe()}" + (f", centre-cropped to {p.crop} px" if p.crop else ""))
        sets.append(found)
    return sets


def analyse(rows: list[Measurement], names: list[str], anchor: str, p, seed: int, images_of: dict[str, int]):
    """Every table of one set's rows: both conventions, pairwise comparisons and BD-rates."""
    boot = {"n_boot": p.bootstrap, "seed": seed, "min_images": p.min_images}
    # secondary convention: average per setting, then interpolate
    curves = average_curves(rows)
    averaged = at_rates(curves, p.rates, p.rate_slack)
    bd_avg = bd_table(curves, anchor, p.bd_method, p.bd_max_bpp)
    # primary convention: each image's own curve at the rates, then average
    img_curves = stats.image_curves(rows)
    each_at = stats.per_image_at(img_curves, p.rates, QUALITIES, p.rate_slack)
    points = stats.at_rates_per_image(each_at, names, p.rates, QUALITIES, images_of, **boot)
    pairs = stats.pairwise(each_at, names, p.rates, COMPARED, **boot)
    bd, bd_each = bd_per_image_table(img_curves, names, anchor, p.bd_method, bd_avg, **boot, max_rate=p.bd_max_bpp)
    return {"curves": curves, "averaged": averaged, "bd_avg": bd_avg, "img_curves": img_curves, "each_at": each_at,
            "points": points, "pairs": pairs, "bd": bd, "bd_each": bd_each}


def megapixels(images: ImageSet) -> float:
    return sum(w * h for w, h in images.sizes) / 1e6


def evaluate(params, out_dir: Path | None = None, kodak_dir: Path | None = None, rnn_loader=None, *,
             images_dir: Path | None = None, test_photos_dir: Path | None = None) -> dict[str, Any]:
    """Run the whole evaluation for ``params`` (full Params) and write ``out_dir``; returns metrics.

    ``kodak_dir``, ``images_dir``, ``test_photos_dir``: the folders of the sets ``kodak``, ``images`` and
    ``data.test_photos``; a folder left out is dvc.yaml's. ``rnn_loader(model, device)`` returns the RNN codec
    object (default: ``load_rnn``).
    """
    import platform

    import torch

    from pipeline.stage import fill
    from pipeline.utils import atomic_path, log, select_device

    dirs = fill(STAGE, PATHS, out=out_dir, kodak=kodak_dir, images=images_dir, test_photos=test_photos_dir)
    out_dir, kodak_dir, images_dir, test_photos_dir = dirs.out, dirs.kodak, dirs.images, dirs.test_photos

    p = params.evaluate
    start = time.perf_counter()
    folders = {"kodak": Path(kodak_dir), "images": Path(images_dir), "test_photos": Path(test_photos_dir)}
    sets = open_sets(params, folders)
    primary = sets[0]
    only: dict[str, set[str]] = {}
    if p.rnn_images is not None and "rnn" in p.codecs and primary.kodak:
        wanted = {f"kodim{i:02d}" for i in p.rnn_images}
        missing = sorted(wanted - set(primary.names))
        if missing:
            raise PipelineError(f"evaluate.rnn_images: {', '.join(missing)} not among the evaluated images "
                                f"(in {primary.folder})")
        only["rnn"] = wanted
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
    if primary.kodak:
        visual_image = f"kodim{p.visual_image:02d}"
    else:  # another set: its N-th image by file name
        visual_image = primary.names[p.visual_image - 1] if p.visual_image <= len(primary.names) else ""
    if visual_image not in primary.names:
        log(f"[evaluate] visual_image {visual_image or p.visual_image} is not evaluated: using {primary.names[0]}")
        visual_image = primary.names[0]
    log(f"[evaluate] {len(primary.paths)} image(s) of {primary.name}, codecs {', '.join(names)} on {device}"
        + (f"; rnn on {len(only['rnn'])} of them" if "rnn" in only else ""))

    rows, picks, original, seconds = run_sweeps(primary, codecs, device=device, visual_image=visual_image,
                                                visual_bpp=p.visual_bpp, only=only)
    images_of = {c: len({r.image for r in rows if r.codec == c}) for c in names}
    t = analyse(rows, names, anchor, p, params.seed, images_of)
    duration = time.perf_counter() - start
    mp = megapixels(primary)
    extras = []
    for other in sets[1:]:
        t0 = time.perf_counter()
        log(f"[evaluate] extra set {other.name}: {len(other.paths)} image(s)")
        x_rows, _, _, x_seconds = run_sweeps(other, codecs, device=device, visual_image=None, visual_bpp=p.visual_bpp)
        x_of = {c: len({r.image for r in x_rows if r.codec == c}) for c in names}
        extras.append((other, x_rows, analyse(x_rows, names, anchor, p, params.seed, x_of), x_seconds,
                       time.perf_counter() - t0))
    metrics = metrics_json(t["points"], t["bd"], anchor, len(primary.paths), duration, t["averaged"])
    for other, _, xt, _, x_duration in extras:
        metrics.setdefault("sets", {})[other.name] = metrics_json(xt["points"], xt["bd"], anchor, len(other.paths),
                                                                  x_duration)
    summary = EvaluationSummary(
        profile=params.profile, images=list(primary.names), crop=p.crop,
        all_kodak=primary.kodak and p.images is None and p.crop is None and len(primary.paths) == 24,
        codecs={c.name: CodecSummary(label=c.label, description=c.describe(), setting=c.setting,
                                     settings=[float(s) for s in c.settings], config=c.config(),
                                     images=images_of[c.name], seconds=round(seconds[c.name], 2),
                                     shared_timing=c.shared_timing,
                                     subset=sorted(only[c.name] & set(primary.names)) if c.name in only else None)
                for c in codecs},
        labels={c.name: c.label for c in codecs}, order=names, skipped=skipped, anchor=anchor,
        bd_method=p.bd_method, bd_max_bpp=p.bd_max_bpp, rates=p.rates, rate_slack=p.rate_slack, bootstrap=p.bootstrap,
        min_images=p.min_images, seed=params.seed, convention="per-image",
        visual_image=visual_image, device=str(device),
        torch=torch.__version__, platform=platform.platform(), duration_s=duration,
        encodes=len(rows), dataset=primary.name, dataset_folder=primary.folder.as_posix(),
        sizes=[list(s) for s in primary.sizes], megapixels=round(mp, 6), limit=p.limit,
        extra_datasets=[other.name for other in sets[1:]],
    )
    # the tables another stage reads go through their records (pipeline.records); the others are plain
    extra = {"per_image_at.csv": t["each_at"], "bd_per_image.csv": t["bd_each"], "bd_avg.csv": t["bd_avg"]}
    records = {"at_rates_avg.csv": [AtRateAvg(**a) for a in t["averaged"]],
               "pairwise.csv": [Pairwise(**a) for a in t["pairs"]]}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_outputs(tmp, rows, t["curves"], t["points"], t["bd"], metrics, summary, picks, original, p,
                      extra=extra, records=records, img_curves=t["img_curves"], images_of=images_of)
        (tmp / "sets").mkdir()
        for other, x_rows, xt, x_seconds, x_duration in extras:
            write_set(tmp / "sets" / other.name, other, x_rows, xt, x_seconds, x_duration)
    log(f"[evaluate] {len(rows)} coded files in {duration:.1f} s ({duration / max(mp, 1e-9):.1f} s per megapixel "
        f"of {primary.name}) -> {out_dir}")
    return metrics


def write_set(out: Path, images: ImageSet, rows: list[Measurement], t: dict[str, Any], seconds: dict[str, float],
              duration: float) -> None:
    """An extra set's headline tables: per_image.csv, at_rates.csv, pairwise.csv, bd.csv and set.json."""
    from pipeline.utils import save_json

    out.mkdir(parents=True)
    write_table(out / "per_image.csv", rows)
    write_table(out / "at_rates.csv", [AtRate(**a) for a in t["points"]])
    write_table(out / "pairwise.csv", [Pairwise(**a) for a in t["pairs"]])
    write_table(out / "bd.csv", [BDRate(**r) for r in t["bd"]])
    save_json(out / "set.json", {"name": images.name, "folder": images.folder.as_posix(), "images": images.names,
                                 "sizes": [list(s) for s in images.sizes], "describe": describe_sizes(images.sizes),
                                 "crop": images.crop, "megapixels": round(megapixels(images), 6),
                                 "duration_s": round(duration, 2), "encodes": len(rows),
                                 "seconds": {k: round(v, 2) for k, v in seconds.items()}})


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and v is not None and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active."""
    import mlflow

    from pipeline.utils import seed_everything

    seed_everything(params.seed)
    metrics = evaluate(params, out_dir=paths.out, kodak_dir=paths.kodak, images_dir=paths.images,
                       test_photos_dir=paths.test_photos)
    mlflow.log_metrics(_flat(metrics))
    curves = read_table(paths.out / "curves.csv", CurvePoint)
    for codec, pts in by_codec(curves).items():  # each curve as a stepped metric (step = sweep index)
        for i, pt in enumerate(pts):
            mlflow.log_metrics({f"curve.{codec}.bpp": pt.bpp, f"curve.{codec}.ms_ssim": pt.ms_ssim,
                                f"curve.{codec}.psnr": pt.psnr}, step=i)
    mlflow.log_artifacts(str(paths.out), artifact_path="evaluation")
