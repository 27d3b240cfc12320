"""Evaluate an RNN codec model file against classical codecs on Kodak, with the project's own `evaluate`
(entropy-coded .rnnc, per-image curves, bootstrap intervals), outside the DVC pipeline: for a shipped or
candidate model as it is, without the cpu profile's fine-tune.

    python bench/eval_model.py --model models/rnnc-cpu.pt --kodak ../shared/datasets/kodak --out /tmp/eval

Writes the evaluate stage's outputs into --out (a new folder) and prints the RNN's per-image MS-SSIM
difference to the first other codec at a grid of rates, with 95 % bootstrap intervals.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params, set_params  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.evaluation import stats  # noqa: E402
from pipeline.evaluation.evaluate import evaluate  # noqa: E402

RATES = [0.125, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]


def crossover(out: Path, anchor: str, rates: list[float] = RATES) -> list[dict]:
    """Per-image RNN - anchor MS-SSIM at ``rates`` from ``out``/per_image.csv (stats.pairwise rows)."""
    text = {"image", "codec", "setting_name"}
    with open(out / "per_image.csv", newline="") as f:
        rows = [SimpleNamespace(**{k: (v if k in text else float(v)) for k, v in r.items()}) for r in csv.DictReader(f)]
    points = stats.per_image_at(stats.image_curves(rows), rates, ["ms_ssim"], 0.0)
    return stats.pairwise(points, [anchor, "rnn"], rates, ["ms_ssim"], n_boot=2000, seed=0, min_images=3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="RNN codec model file (models/rnnc-cpu.pt) or MLflow model URI")
    ap.add_argument("--kodak", required=True, type=Path, help="folder of kodim01.png ... kodim24.png")
    ap.add_argument("--out", required=True, type=Path, help="new folder for the evaluation's outputs")
    ap.add_argument("--codecs", default="jpeg,jpeg2000,rnn", help="comma-separated evaluate.codecs")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every core)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file (cpu profile applied)")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists (give a new folder)", file=sys.stderr)
        return 1
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    try:
        with tempfile.TemporaryDirectory() as tmp:  # the user's params.yaml is never written
            params_file = Path(tmp) / "params.yaml"
            params_file.write_text(args.params.read_text())
            set_params(params_file, "cpu", [f"evaluate.rnn_model={args.model}", f"evaluate.codecs=[{','.join(codecs)}]",
                                            f"evaluate.cpu_threads={args.threads}"])
            evaluate(load_params(params_file), out_dir=args.out, kodak_dir=args.kodak)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    anchor = next((c for c in codecs if c != "rnn"), None)
    if anchor and "rnn" in codecs:
        print(f"per image, MS-SSIM rnn - {anchor} (mean [95 % CI], images where rnn is ahead):")
        for r in crossover(args.out, anchor):
            print(f"  {r['bpp']:.3f} bpp  {-r['mean_diff']:+.4f} [{-r['hi']:+.4f}, {-r['lo']:+.4f}]  "
                  f"{r['b_wins']}/{r['images']}  {r['better']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
