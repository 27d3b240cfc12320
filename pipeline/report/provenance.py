"""The report's provenance: git commit, hashes of the data files, MLflow run ids and durations, hardware."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluation.codecs import REGISTRY
from pipeline.records import EvaluationSummary
from pipeline.utils import file_digest


def md5_path(path: Path) -> tuple[str, int] | None:
    """md5 of a file (= DVC's file hash), or of a directory's sorted 'relpath md5' lines; and the file count."""
    if path.is_file():
        return file_digest(path, "md5"), 1
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        lines = "".join(f"{p.relative_to(path).as_posix()} {file_digest(p, 'md5')}\n" for p in files)
        return hashlib.md5(lines.encode()).hexdigest(), len(files)
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def hardware() -> dict[str, str]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": str(os.cpu_count())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    except Exception:  # torch missing or CUDA broken: the report still builds
        info["gpu"] = "unknown"
    try:
        info["codecs"] = ", ".join(v for v in (cls.library() for cls in REGISTRY.values()) if v)
    except Exception:  # a library that cannot say its version: the report still builds
        pass
    return info


def data_hashes(paths: list[Path]) -> list[dict[str, str]]:
    rows = []
    for p in paths:
        h = md5_path(p)
        if h is not None:
            rows.append({"path": p.as_posix(), "md5": h[0], "files": str(h[1]),
                         "kind": "file md5 (as DVC)" if p.is_file() else "md5 of sorted 'path md5' lines"})
    return rows


def mlflow_runs(experiment: str, current_run_id: str | None = None) -> list[dict[str, str]]:
    """The latest MLflow run of every stage (id, status, start, duration), found by the dvc_stage tag."""
    from pipeline import tracking

    mlflow = tracking.mlflow_module()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id], order_by=["attribute.start_time DESC"], max_results=500,
                              output_format="list")
    parent = None
    if current_run_id:
        cur = mlflow.get_run(current_run_id)
        parent = cur.data.tags.get("mlflow.parentRunId")
    out = []
    from pipeline.stage import dvc_commands

    for stage in dvc_commands():  # every stage, in dvc.yaml's order
        cands = [r for r in runs if r.data.tags.get("dvc_stage") == stage]
        if parent:  # prefer runs of the same pipeline run
            same = [r for r in cands if r.data.tags.get("mlflow.parentRunId") == parent]
            cands = same or cands
        if stage == "report" and current_run_id:
            cands = [r for r in cands if r.info.run_id == current_run_id] or cands
        if not cands:
            continue
        r = cands[0]
        start = dt.datetime.fromtimestamp(r.info.start_time / 1000, dt.timezone.utc)
        dur = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None
        this = r.info.run_id == current_run_id
        out.append({"stage": stage, "run_id": r.info.run_id, "status": "this run" if this else r.info.status,
                    "start": start.strftime("%Y-%m-%d %H:%M:%S UTC"),
                    "duration": f"{dur:.1f} s" if dur is not None else ("-" if this else "unfinished")})
    return out


def provenance(params, run_id: str | None, classifier_dir: Path, eval_dir: Path, compressor_dir: Path,
               kodak_dir: Path) -> dict[str, Any]:
    """Where the report's numbers come from; ``kodak_dir``: the image folder hashed when the evaluation's
    summary does not name the evaluated set's."""
    from pipeline import tracking

    runs: list[dict[str, str]] = []
    runs_note = ""
    if params.report.mlflow_runs:
        try:
            runs = mlflow_runs(params.tracking.experiment, run_id)
        except Exception as err:  # the report must not fail because the tracking store is unreachable
            runs_note = f"MLflow lookup failed: {type(err).__name__}: {err}"
    try:  # the evaluated image set's folder (summary.json records it)
        image_dir = Path(EvaluationSummary.read(eval_dir / "summary.json").dataset_folder)
    except PipelineError:
        image_dir = kodak_dir
    hashes = data_hashes([image_dir, compressor_dir / "model.pt", classifier_dir / "model.pt",
                          classifier_dir / "metrics.json", compressor_dir / "metrics.json",
                          eval_dir / "per_image.csv", eval_dir / "curves.csv", eval_dir / "bd.csv",
                          eval_dir / "metrics.json", Path("params.yaml"), Path("dvc.yaml")])
    return {
        "git_commit": tracking.git_commit(),
        "git_date": _git("log", "-1", "--format=%cI") or "unknown",
        "profile": params.profile, "seed": params.seed,
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "mlflow_uri": tracking.tracking_uri(), "experiment": params.tracking.experiment,
        "report_run_id": run_id, "runs": runs, "runs_note": runs_note,
        "hashes": hashes, "hardware": hardware(),
    }
