"""Stage ``report``: one self-contained HTML report (images inlined) and a Markdown summary.

Reads the classifier's and the evaluation's outputs, checks each claim of the coursework against
our numbers (verdicts are computed here, never written by hand), and records the provenance: git
commit, hashes of the data files, MLflow run ids and durations, profile, hardware.

Every verdict comes from a 95 % interval (bootstrap over images for the codec claims, Wilson for the
test accuracy): "confirmed" when the interval lies on the claimed side, "refuted" when it lies on the
other side, "not shown" otherwise (see ``pipeline.evaluation.stats``).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.stats import wilson  # noqa: F401 - also the report's public name
from pipeline.records import AtRate, BDRate, ClassifierMetrics, EvaluationSummary, Measurement, by_codec, read_table
from pipeline.report.claims import CIFAR10_TEST_SIZE, check_claims
from pipeline.report.formatting import TTA_NAMES, finite, fmt
from pipeline.report.inputs import Inputs, read_inputs
from pipeline.report.longrun import as_dict
from pipeline.report.provenance import provenance
from pipeline.utils import atomic_write_text, load_json, log

STAGE = "report"
#: the stage's input and output folders (pipeline/stage.py); dvc.yaml's cmd gives them
PATHS = ("classifier", "compressor", "evaluation", "cifar", "out")
SECTIONS = ("report",)  # and tracking.experiment, to find the stages' MLflow runs (not a result param)
KODAK_DIR = Path("data/raw/kodak")  # hashed for the provenance only (or the evaluated set's folder)
TEMPLATE = Path(__file__).with_name("template.html")
CLASSIFIER_FIGURES = [
    ("fig1_1_accuracy.png", "Figure 1.1: train and test accuracy per epoch"),
    ("fig1_2_predictions.png", "Figure 1.2: test images and the classifier's output probabilities "
                               "(true class blue, wrong guess red)"),
    ("confusion_matrix.png", "Confusion matrix on the CIFAR-10 test set"),
]
LONG_RUN_TITLE = "### The coursework's own recipe (300 epochs), trained outside `make run`"
EVAL_FIGURES = [
    ("ms_ssim_at_rate.png", "Figure 1.7 analogue (primary convention): MS-SSIM (5-scale, Wang et al. 2003) at equal "
                            "rate, the mean over images of each image's own interpolated curve, drawn where every "
                            "image reaches the rate; bars: 95% bootstrap intervals at the report's rates"),
    ("psnr_at_rate.png", "PSNR (RGB) at equal rate (primary convention, as above)"),
    ("ms_ssim_vs_bpp.png", "Secondary convention: MS-SSIM vs bpp, one point per codec setting, bpp and quality "
                           "averaged over images (CompressAI-style)"),
    ("ms_ssim_db_vs_bpp.png", "Secondary convention: MS-SSIM in dB (-10 log10(1 - MS-SSIM)) vs bpp, averaged per setting"),
    ("psnr_vs_bpp.png", "Secondary convention: PSNR (RGB) vs bpp, averaged per setting"),
    ("ssim_vs_bpp.png", "Secondary convention: single-scale SSIM vs bpp (the metric the coursework's Figure 1.7 "
                        "actually plotted), averaged per setting"),
]


# ----------------------------------------------------------------------------- helpers

def data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    kind = mime.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# ----------------------------------------------------------------------------- inputs

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {}
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- claims


# ----------------------------------------------------------------------------- provenance


# ----------------------------------------------------------------------------- assembling

def _ci(row: AtRate | None, q: str, digits: int) -> str:
    lo, hi = getattr(row, f"{q}_lo", None), getattr(row, f"{q}_hi", None)
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]" if finite(lo) and finite(hi) else ""


def _rate_cell(p: AtRate | None, of: int | None) -> dict[str, str]:
    n = p.images if p else 0
    return {"ms_ssim": fmt(getattr(p, "ms_ssim", None), 4), "ms_ssim_ci": _ci(p, "ms_ssim", 4),
            "ms_ssim_db": fmt(getattr(p, "ms_ssim_db", None), 2),
            "psnr": fmt(getattr(p, "psnr", None), 2), "psnr_ci": _ci(p, "psnr", 2), "n": f"{n}/{of or n}"}


def _bd_rows(bd: list[BDRate], labels: dict[str, str], anchor: str) -> list[dict[str, str]]:
    rows = []
    for r in bd:
        ci = f"[{fmt(r.bd_rate_lo, 1, True, True)}, {fmt(r.bd_rate_hi, 1, True, True)}]" if finite(r.bd_rate_lo) else ""
        rows.append({"anchor": labels.get(r.anchor, r.anchor), "test": labels.get(r.test, r.test),
                     "metric": {"ms_ssim_db": "MS-SSIM dB", "psnr": "PSNR"}.get(r.metric, r.metric),
                     "bd_rate": fmt(r.bd_rate_pct, 1, pct=True, signed=True), "ci": ci,
                     "n": f"{r.images}/{r.of_images}", "saves": str(r.test_saves),
                     "bd_quality": fmt(r.bd_quality_db, 2, signed=True),
                     "bd_rate_avg": fmt(r.bd_rate_avg_curve_pct, 1, pct=True, signed=True),
                     "section": "vs anchor" if r.anchor == anchor else "RNN vs codec"})
    return rows


def set_name(s: EvaluationSummary) -> str:
    """The evaluated set, as headings name it: ``Kodak``, or the set's name and folder."""
    return "Kodak" if s.dataset == "kodak" else f"{s.dataset} ({s.dataset_folder})"


def extra_sets(eval_dir: Path, s: EvaluationSummary) -> list[dict[str, Any]]:
    """The headline tables of each extra set (``sets/<name>/`` of the evaluation): quality at the rates and
    the per-image BD-rates, computed on that set alone."""
    out = []
    for name in s.extra_datasets:
        d = eval_dir / "sets" / name
        if not (d / "set.json").is_file():
            out.append({"name": name, "scope": f"missing: {d}", "rate_rows": [], "bd_rows": []})
            continue
        info = load_json(d / "set.json")
        at = {(r.codec, r.bpp): r for r in read_table(d / "at_rates.csv", AtRate)}
        per_image = read_table(d / "per_image.csv", Measurement)
        of = {c: len({m.image for m in per_image if m.codec == c}) for c in s.order}
        rows = [{"codec": s.labels.get(c, c), "cells": [_rate_cell(at.get((c, float(r))), of.get(c)) for r in s.rates]}
                for c in s.order]
        mp = info.get("megapixels") or 0
        out.append({"name": name, "rate_rows": rows, "bd_rows": _bd_rows(read_table(d / "bd.csv", BDRate), s.labels,
                                                                          s.anchor),
                    "scope": f"{info['describe']} in {info['folder']}"
                             + (f", centre-cropped to {info['crop']} px" if info.get("crop") else "")
                             + f"; {info['duration_s']:.0f} s for {info['encodes']} coded files"
                             + (f" ({info['duration_s'] / mp:.1f} s per megapixel)" if mp else "")})
    return out


def tables(inputs: Inputs) -> dict[str, Any]:
    s = inputs.summary
    labels = s.labels
    rates = s.rates
    at = {(r.codec, r.bpp): r for r in inputs.at_rates}
    avg = {(r.codec, r.bpp): r for r in inputs.at_rates_avg}
    codecs = s.order
    of = {c: s.codecs[c].images for c in codecs}
    rate_rows, avg_rows = [], []
    for c in codecs:
        row = {"codec": labels.get(c, c), "cells": []}
        arow = {"codec": labels.get(c, c), "cells": []}
        for rate in rates:
            p = at.get((c, float(rate)))
            row["cells"].append(_rate_cell(p, of.get(c)))
            a = avg.get((c, float(rate)))
            diff = p.ms_ssim - a.ms_ssim if a and p else float("nan")
            pdiff = p.psnr - a.psnr if a and p else float("nan")
            arow["cells"].append({"ms_ssim": fmt(getattr(a, "ms_ssim", None), 4), "psnr": fmt(getattr(a, "psnr", None), 2),
                                  "diff": fmt(diff, 4, signed=True), "psnr_diff": fmt(pdiff, 2, signed=True)})
        rate_rows.append(row)
        avg_rows.append(arow)
    bd_rows = _bd_rows(inputs.bd, labels, s.anchor)
    pair_rows = []
    for r in inputs.pairwise:
        if r.metric != "ms_ssim":
            continue
        ci = f"[{fmt(r.lo, 4, signed=True)}, {fmt(r.hi, 4, signed=True)}]" if finite(r.lo) else "n/a"
        pair_rows.append({"a": labels.get(r.a, r.a), "b": labels.get(r.b, r.b), "bpp": f"{r.bpp:g}",
                          "n": str(r.images), "a_wins": str(r.a_wins), "b_wins": str(r.b_wins),
                          "diff": fmt(r.mean_diff, 4, signed=True), "ci": ci,
                          "better": labels.get(r.better, r.better)})
    ranges = []
    for c, pts in by_codec(inputs.curves).items():
        info = s.codecs[c]
        shared = " *" if info.shared_timing else ""
        ranges.append({"codec": labels.get(c, c), "setting": pts[0].setting_name,
                       "settings": ", ".join(f"{p.setting:g}" for p in sorted(pts, key=lambda p: p.setting)),
                       "bpp": f"{min(p.bpp for p in pts):.3f} - {max(p.bpp for p in pts):.3f}",
                       "encode_ms": f"{1000 * np.mean([p.encode_s for p in pts]):.1f}" + shared,
                       "decode_ms": f"{1000 * np.mean([p.decode_s for p in pts]):.1f}" + shared,
                       "images": str(info.images), "seconds": f"{info.seconds:.0f}" if finite(info.seconds) else "n/a"})
    settings = [{"codec": labels.get(c, c), "description": s.codecs[c].description,
                 "config": "; ".join(f"{k}: {v}" for k, v in s.codecs[c].config.items()),
                 "sweep": f"{s.codecs[c].setting} " + ", ".join(f"{v:g}" for v in s.codecs[c].settings)}
                for c in codecs]
    return {"rates": rates, "rate_rows": rate_rows, "avg_rows": avg_rows, "bd_rows": bd_rows, "pair_rows": pair_rows,
            "ranges": ranges, "settings": settings}


CONVENTION = ("Quality at a rate is measured per image: each image's own (bpp, quality) points of a codec are "
              "interpolated at the rate (monotone piecewise-cubic PCHIP in log-bpp, no extrapolation); a cell is "
              "the mean over the images whose curve reaches the rate (n/N says how many), with a 95% bootstrap "
              "interval over images. This reads as 'every image coded at that rate'. The secondary convention "
              "(CompressAI's plots) averages bpp and quality over images per codec setting and interpolates that "
              "curve; it favours codecs whose rate varies from image to image where the curve is steep.")



def classifier_summary(params, m: ClassifierMetrics | None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The classifier's section: (what, value) rows (recipe, length, accuracy with its interval, time) and
    the per-class accuracies, for both report.html and report.md."""
    if m is None:
        return [], []
    recipe, batch = params.train_classifier.recipe, params.train_classifier.batch_size
    n = m.test_size or CIFAR10_TEST_SIZE
    lo, hi = wilson(m.test_acc, n)
    tta = TTA_NAMES.get(m.tta, str(m.tta)) if m.tta is not None else "?"
    rows = [("recipe", f"{recipe} (profile {params.profile})"),
            ("epochs, batch size", f"{m.epochs if m.epochs is not None else '?'}, {batch}"),
            ("test accuracy", f"{m.test_acc:.2%} (95% CI [{lo:.2%}, {hi:.2%}], {n} test images; TTA: {tta})")]
    if m.test_acc_no_tta is not None:
        rows.append(("test accuracy without TTA", f"{m.test_acc_no_tta:.2%}"))
    if m.train_acc is not None:
        rows.append(("final training accuracy", f"{m.train_acc:.2%}"))
    if m.train_time_s is not None and finite(m.train_time_s):
        speed = f", {m.images_per_s:,.0f} images/s" if m.images_per_s and finite(m.images_per_s) else ""
        rows.append(("training time", f"{m.train_time_s:,.0f} s ({m.train_time_s / 60:.1f} min){speed}"))
    if m.parameters:
        rows.append(("parameters", f"{m.parameters:,}"))
    per_class = [{"name": name, "acc": f"{acc:.1%}"} for name, acc in m.per_class_acc.items() if finite(acc)]
    return [{"key": k, "value": v} for k, v in rows], per_class


LOSSES = {"l1": "L1 (mean absolute error)", "l2": "L2 (mean squared error)",
          "l1_ssim": "{w:g} (1 - SSIM) + {r:g} L1", "l1_msssim": "{w:g} (1 - MS-SSIM) + {r:g} L1"}


def codec_training(p) -> str:
    """One sentence on how the RNN codec of this run was trained (``params.train_compressor``): what its
    quality figures should be read against (a codec trained for MS-SSIM trades PSNR for it)."""
    loss = LOSSES.get(p.loss, p.loss).format(w=p.ssim_weight, r=round(1 - p.ssim_weight, 6))
    start = f"warm-started from {p.init} and " if p.init else ""
    text = (f"The RNN codec ({p.cell.upper()} cells, {p.iterations} iterations) was {start}trained with the loss "
            f"{loss} on every iteration's reconstruction")
    if p.loss in ("l1_ssim", "l1_msssim"):
        text += ": trained for structural similarity as well as for the pixels, it trades some PSNR for MS-SSIM"
    return text + "."


def context(params, inputs: Inputs, prov: dict[str, Any], classifier_dir: Path, eval_dir: Path) -> dict[str, Any]:
    rp = params.report
    s = inputs.summary
    labels = s.labels
    acc = inputs.classifier.test_acc if inputs.classifier else None
    classifier_figs = [{"caption": cap, "src": data_uri(classifier_dir / "figures" / name),
                        "path": (classifier_dir / "figures" / name).as_posix()} for name, cap in CLASSIFIER_FIGURES]
    eval_figs = [{"caption": cap, "src": data_uri(eval_dir / "figures" / name),
                  "path": (eval_dir / "figures" / name).as_posix()} for name, cap in EVAL_FIGURES]
    visual = []
    if inputs.visual:
        vdir = eval_dir / "visual"
        visual.append({"caption": f"original ({inputs.visual['image']})", "src": data_uri(vdir / inputs.visual["original"])})
        for codec, e in inputs.visual["codecs"].items():
            visual.append({"caption": f"{labels.get(codec, codec)}, {e['setting_name']} {e['setting']:g}: "
                                      f"{e['bpp']:.3f} bpp, MS-SSIM {e['ms_ssim']:.4f}, PSNR {e['psnr']:.2f} dB",
                           "src": data_uri(vdir / e["file"])})
    rnn_subset = s.codecs["rnn"].subset if "rnn" in s.codecs else None
    if s.dataset != "kodak":
        from pipeline.evaluation.datasets import describe_sizes

        sizes = [tuple(wh) for wh in s.sizes]
        scope = (f"the image set {s.dataset} in {s.dataset_folder}: {describe_sizes(sizes)}"
                 + (f" (the first {s.limit} by file name)" if s.limit else "")
                 + (f", centre-cropped to {s.crop} px" if s.crop else "") + f" (profile {s.profile})")
    else:
        scope = (f"all {len(s.images)} Kodak images at full size" if s.all_kodak else
                 f"a subset of Kodak: {', '.join(s.images)}" + (f", centre-cropped to {s.crop} px" if s.crop else "")
                 + f" (profile {s.profile}; the gpu profile evaluates all 24 images at full size)")
    if rnn_subset:
        scope += f"; the RNN codec on {len(rnn_subset)} of them ({', '.join(rnn_subset)})"
    classifier_rows, per_class = classifier_summary(params, inputs.classifier)
    durations = [{"what": "evaluate (encoding, decoding and metrics)",
                  "value": f"{s.duration_s:.1f} s for {s.encodes} coded files"
                           + (f", {s.duration_s / s.megapixels:.1f} s per megapixel of {set_name(s)}"
                              if s.megapixels else "")}]
    for c, info in s.codecs.items():
        if finite(info.seconds):
            durations.append({"what": f"evaluate: {labels.get(c, c)} ({info.images} images, coding and metrics)",
                              "value": f"{info.seconds:.1f} s"})
    if inputs.classifier and finite(inputs.classifier.train_time_s):
        durations.append({"what": "train_classifier (train_time_s)", "value": f"{inputs.classifier.train_time_s:.1f} s"})
    for key, v in _flatten(inputs.compressor or {}).items():
        if finite(v) and re.search(r"(time|duration|seconds)(_s)?$", key):
            durations.append({"what": f"train_compressor ({key})", "value": f"{v:.1f} s"})
    claims = check_claims(inputs, rp)
    return {
        "title": rp.title, "prov": prov, "summary": s, "labels": labels, "scope": scope,
        "accuracy": (f"{acc:.2%}" if acc is not None else "n/a"), "accuracy_key": "test_acc" if acc is not None else None,
        "classifier_rows": classifier_rows, "per_class": per_class, "classifier_figs": classifier_figs,
        "eval_figs": eval_figs, "long_run": as_dict(inputs.long_run),
        "visual": visual, "visual_info": inputs.visual, "claims": claims, "missing": inputs.missing,
        "set_name": set_name(s), "extra_sets": extra_sets(eval_dir, s),
        "skipped": s.skipped, "durations": durations, "convention": CONVENTION, "codec_training": codec_training(params.train_compressor),
        **tables(inputs),
    }


def render_html(ctx: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE.read_text()).render(**ctx)


def render_md(ctx: dict[str, Any]) -> str:
    p = ctx["prov"]
    out = [f"# {ctx['title']}", "",
           f"Profile `{p['profile']}`, commit `{p['git_commit']}`, generated {p['generated']}. "
           "Figures and the visual comparison are in report.html (self-contained).", "",
           "## Claims of the coursework, checked", "", "| claim | metric | our numbers | verdict |", "|---|---|---|---|"]
    out += [f"| {c.claim} | {c.metric} | {c.evidence} | **{c.verdict}** |" for c in ctx["claims"]]
    out += ["", "## Classifier (CIFAR-10)", "", f"Test accuracy: **{ctx['accuracy']}**" +
            (f" (`{ctx['accuracy_key']}`)" if ctx["accuracy_key"] else ""), ""]
    if ctx["classifier_rows"]:
        out += ["| | |", "|---|---|"] + [f"| {r['key']} | {r['value']} |" for r in ctx["classifier_rows"]] + [""]
    if ctx["per_class"]:
        out += ["Accuracy per class (with TTA):", "", "| " + " | ".join(c["name"] for c in ctx["per_class"]) + " |",
                "|" + "---|" * len(ctx["per_class"]), "| " + " | ".join(c["acc"] for c in ctx["per_class"]) + " |", ""]
    out += ["Figures (in report.html, and as files): " + "; ".join(
        f"{f['caption']} (`{f['path']}`{'' if f['src'] else ', missing'})" for f in ctx["classifier_figs"]) + ".", ""]
    if ctx["long_run"]:
        out += [LONG_RUN_TITLE, "", "| | |", "|---|---|"]
        out += [f"| {r['key']} | {r['value']} |" for r in ctx["long_run"]["rows"]]
        out += ["", "Its Figures 1.1, 1.2 and confusion matrix are in report.html.", ""]
    out += [f"## Compression on {ctx['set_name']}", "", f"Evaluated on {ctx['scope']}.", "",
            ctx["codec_training"], "", ctx["convention"], "",
            "### Quality at fixed rates (primary: per-image interpolation)", "",
            "Mean over the images that reach the rate, 95% bootstrap interval, n/N images; n/a: no image reaches it.", ""]
    head = "| codec | " + " | ".join(f"MS-SSIM @{r:g} | PSNR @{r:g} | n @{r:g}" for r in ctx["rates"]) + " |"
    out += [head, "|---|" + "---|" * (3 * len(ctx["rates"]))]
    for row in ctx["rate_rows"]:
        out.append(f"| {row['codec']} | " + " | ".join(f"{c['ms_ssim']} {c['ms_ssim_ci']} | {c['psnr']} {c['psnr_ci']} | {c['n']}"
                                                       for c in row["cells"]) + " |")
    out += ["", "### Secondary: averaged per setting, and the difference (primary - secondary)", ""]
    head = "| codec | " + " | ".join(f"MS-SSIM @{r:g} | diff @{r:g} | PSNR @{r:g} | diff @{r:g}" for r in ctx["rates"]) + " |"
    out += [head, "|---|" + "---|" * (4 * len(ctx["rates"]))]
    for row in ctx["avg_rows"]:
        out.append(f"| {row['codec']} | " + " | ".join(f"{c['ms_ssim']} | {c['diff']} | {c['psnr']} | {c['psnr_diff']}"
                                                       for c in row["cells"]) + " |")
    out += ["", "### Pairwise comparisons at the rates (MS-SSIM, per image, paired)", "",
            "| A | B | bpp | images | A wins | B wins | mean A-B | 95% CI | better |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['a']} | {r['b']} | {r['bpp']} | {r['n']} | {r['a_wins']} | {r['b_wins']} | {r['diff']} | {r['ci']} | "
            f"{r['better']} |" for r in ctx["pair_rows"]]
    cut = f", rates up to {ctx['summary'].bd_max_bpp:g} bpp" if ctx["summary"].bd_max_bpp else ""
    out += ["", f"### Bjontegaard deltas per image ({ctx['summary'].bd_method}{cut}; BD-rate > 0: the test codec needs "
            "more bits)", "", "| anchor | test | metric | median BD-rate | 95% CI | images | test saves bits on | "
            "median BD-quality (dB) | BD-rate, averaged curves |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['anchor']} | {r['test']} | {r['metric']} | {r['bd_rate']} | {r['ci']} | {r['n']} | {r['saves']} | "
            f"{r['bd_quality']} | {r['bd_rate_avg']} |" for r in ctx["bd_rows"]]
    for x in ctx["extra_sets"]:
        out += ["", f"### Also evaluated: {x['name']}", "", f"{x['scope']}. The same codecs and settings; quality at "
                "the rates (primary convention) and per-image BD-rates, on this set alone.", ""]
        out += ["| codec | " + " | ".join(f"MS-SSIM @{r:g} | n @{r:g}" for r in ctx["rates"]) + " |",
                "|---|" + "---|" * (2 * len(ctx["rates"]))]
        out += [f"| {row['codec']} | " + " | ".join(f"{c['ms_ssim']} {c['ms_ssim_ci']} | {c['n']}" for c in row["cells"])
                + " |" for row in x["rate_rows"]]
        out += ["", "| anchor | test | metric | median BD-rate | 95% CI | images |", "|---|---|---|---|---|---|"]
        out += [f"| {r['anchor']} | {r['test']} | {r['metric']} | {r['bd_rate']} | {r['ci']} | {r['n']} |"
                for r in x["bd_rows"]]
    out += ["", "### Codec settings", "", "| codec | implementation | fixed settings | sweep |", "|---|---|---|---|"]
    out += [f"| {r['codec']} | {r['description']} | {r['config']} | {r['sweep']} |" for r in ctx["settings"]]
    out += ["", "## Provenance", "", f"- git commit: `{p['git_commit']}` ({p['git_date']})",
            f"- profile: `{p['profile']}`, seed {p['seed']}",
            f"- MLflow: {p['mlflow_uri']}, experiment `{p['experiment']}`, report run `{p['report_run_id']}`"]
    out += [f"- MLflow run `{r['run_id']}`: {r['stage']} ({r['status']}, {r['duration']}, started {r['start']})"
            for r in p["runs"]]
    out += [f"- {k}: {v}" for k, v in p["hardware"].items()]
    out += [f"- {d['what']}: {d['value']}" for d in ctx["durations"]]
    out += [f"- `{h['path']}`: {h['md5']} ({h['kind']}, {h['files']} file(s))" for h in p["hashes"]]
    return "\n".join(out) + "\n"


def build(params, run_id: str | None = None, out_dir: Path | None = None, classifier_dir: Path | None = None,
          eval_dir: Path | None = None, compressor_dir: Path | None = None, cifar_dir: Path | None = None
          ) -> dict[str, Any]:
    """Write the report from the stages' outputs; a folder left out is dvc.yaml's."""
    from pipeline.stage import fill

    dirs = fill(STAGE, PATHS, out=out_dir, classifier=classifier_dir, evaluation=eval_dir, compressor=compressor_dir,
                cifar=cifar_dir)
    out_dir, classifier_dir, eval_dir, compressor_dir = dirs.out, dirs.classifier, dirs.evaluation, dirs.compressor
    long_run = Path(params.report.coursework_run) if params.report.coursework_run else None
    inputs = read_inputs(classifier_dir, eval_dir, compressor_dir, long_run, dirs.cifar)
    for m in inputs.missing:
        log(f"[report] {m} is missing: its section says so")
    prov = provenance(params, run_id, classifier_dir, eval_dir, compressor_dir, KODAK_DIR)
    ctx = context(params, inputs, prov, classifier_dir, eval_dir)
    html, md = render_html(ctx), render_md(ctx)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.html", html)
    atomic_write_text(out_dir / "report.md", md)
    log(f"[report] wrote {out_dir}/report.html ({len(html) / 1024:.0f} KiB) and report.md")
    return ctx


def run(params, paths) -> None:
    """The stage (pipeline/stage.py): ``params`` validated, its MLflow run active."""
    import mlflow

    ctx = build(params, mlflow.active_run().info.run_id, out_dir=paths.out, classifier_dir=paths.classifier,
                eval_dir=paths.evaluation, compressor_dir=paths.compressor, cifar_dir=paths.cifar)
    mlflow.log_artifact(str(paths.out / "report.html"), artifact_path="report")
    mlflow.log_artifact(str(paths.out / "report.md"), artifact_path="report")
    mlflow.log_dict([c.__dict__ for c in ctx["claims"]], "report/claims.json")
    verdicts = [c.verdict for c in ctx["claims"]]
    mlflow.log_metrics({"claims_confirmed": verdicts.count("confirmed"), "claims_refuted": verdicts.count("refuted"),
                        "claims_not_shown": verdicts.count("not shown"),
                        "claims_not_checked": verdicts.count("not checked")})
