"""Compare RNN codec models at equal rate: each model's real .rnnc files on Kodak, per image, against the first.

    python bench/bench_models.py models/rnnc-cpu.pt runs/rnnc-gru/model.pt --kodak ../shared/datasets/kodak
    python bench/bench_models.py A.pt B.pt --kodak ../shared/datasets/kodak --images 04,07,15,23 --json out.json

Quality at k iterations (what ``bench_recipe.py`` and the training logs score) hides what the bits cost: two
models whose codes differ in how predictable they are spend different bytes on the same k. Here every point is
a real file (the default .rnnc version of each model: v5 with its fitted context model, v4 with a table from before v5), as the evaluate stage
measures it: bpp = 8 * file bytes / pixels, MS-SSIM (5 scales) and PSNR of the decoded image. Per image,
each model after the first is compared with the first: MS-SSIM and PSNR at 0.125 / 0.25 / 0.5 bpp (interpolated
in log-rate, pchip, never extrapolated) and BD-rate on MS-SSIM in dB; the table gives means and images won.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.bdrate import bd_rate, interpolate  # noqa: E402
from pipeline.evaluation.codecs import RNN, load_rnn  # noqa: E402
from pipeline.evaluation.datasets import kodak_paths, load  # noqa: E402
from pipeline.evaluation.evaluate import row_of  # noqa: E402
from pipeline.evaluation.metrics import Reference  # noqa: E402

RATES = (0.125, 0.25, 0.5)


def curve(codec: RNN, img: np.ndarray, name: str) -> dict[str, list[float]]:
    """bpp, MS-SSIM, MS-SSIM dB and PSNR of every iteration count's real file (the evaluate stage's measurement)."""
    ref = Reference(img)
    rows = [row_of(codec, coded, name, img, ref) for coded in codec.sweep(img)]
    return {key: [getattr(r, key) for r in rows] for key in ("bpp", "ms_ssim", "ms_ssim_db", "psnr")}


def compare(anchor: dict, test: dict) -> dict[str, float]:
    """One image: test against anchor at the fixed rates, and BD-rate (MS-SSIM dB)."""
    row = {"bd_rate_msssim_db": bd_rate(anchor["bpp"], anchor["ms_ssim_db"], test["bpp"], test["ms_ssim_db"])}
    for metric in ("ms_ssim", "psnr"):
        a = interpolate(anchor["bpp"], anchor[metric], RATES)
        t = interpolate(test["bpp"], test[metric], RATES)
        for r, da in zip(RATES, t - a):
            row[f"{metric}@{r:g}"] = float(da)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model files (.pt); the first is the anchor")
    ap.add_argument("--kodak", type=Path, required=True, help="folder of kodim*.png")
    ap.add_argument("--images", default="all", help="Kodak image numbers, e.g. 04,07,15,23 (default: all 24)")
    ap.add_argument("--json", type=Path, help="also write every curve and comparison here")
    args = ap.parse_args(argv)
    indices = None if args.images == "all" else [int(i) for i in args.images.split(",")]
    paths = kodak_paths(args.kodak, indices)
    codecs = [RNN(load_rnn(m)) for m in args.models]
    curves: dict[str, dict[str, dict]] = {m: {} for m in args.models}
    t0 = time.perf_counter()
    for n, path in enumerate(paths, 1):
        img = load(path)
        for m, codec in zip(args.models, codecs):
            curves[m][path.stem] = curve(codec, img, path.stem)
        print(f"  {n}/{len(paths)} {path.stem} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    anchor = args.models[0]
    result = {"models": args.models, "images": [p.stem for p in paths], "curves": curves, "against": {}}
    for m in args.models:
        bpp = np.array([c["bpp"] for c in curves[m].values()]).mean(0)
        ms = np.array([c["ms_ssim"] for c in curves[m].values()]).mean(0)
        print(f"{m}: mean bpp " + " ".join(f"{b:.3f}" for b in bpp))
        print(" " * len(m) + "  MS-SSIM  " + " ".join(f"{q:.4f}" for q in ms))
    for m in args.models[1:]:
        rows = [compare(curves[anchor][i], curves[m][i]) for i in curves[m]]
        summary = {}
        print(f"\n{m} against {anchor} (per image; mean [images ahead / images with both curves there]):")
        for key in rows[0]:
            v = np.array([r[key] for r in rows], dtype=float)
            ok = v[np.isfinite(v)]
            better = int((ok < 0).sum()) if key.startswith("bd_rate") else int((ok > 0).sum())
            summary[key] = {"mean": float(ok.mean()) if len(ok) else None,
                            "median": float(np.median(ok)) if len(ok) else None, "ahead": better, "of": len(ok)}
            unit = " %" if key.startswith("bd_rate") else ""
            if len(ok):
                print(f"  {key:22s} {ok.mean():+.4f}{unit} (median {np.median(ok):+.4f}) [{better}/{len(ok)}]")
        result["against"][m] = {"per_image": rows, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
