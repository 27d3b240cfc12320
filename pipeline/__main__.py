"""``python -m pipeline <stage> [--<path> PATH ...]``: run one pipeline stage (dvc.yaml calls exactly this).

``python -m pipeline <stage> --help`` lists the stage's path options, with dvc.yaml's paths as defaults; the
contract between this entry point and a stage is written in ``pipeline/stage.py`` (stages are found, not listed).

Also ``python -m pipeline configure [--profile P] [--set KEY=VALUE ...]`` (write params.yaml),
``python -m pipeline params`` (print the resolved params as YAML) and ``python -m pipeline log-model
MODEL.pt [--register NAME]`` (log a model file to MLflow as weights: re-logs a model that an earlier
version logged as a pickle, which is never loaded).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pipeline.errors import PipelineError, run_cli
from pipeline.stage import StagePaths, defaults, discover, dvc_commands, option
from pipeline.schema import PROFILES


def _configure(args: argparse.Namespace) -> None:
    from pipeline.config import PARAMS_FILE, set_params

    changed = set_params(args.params or PARAMS_FILE, args.profile, args.set or [])
    print("params.yaml updated" if changed else "params.yaml unchanged")


def _show(args: argparse.Namespace) -> None:
    import yaml

    from pipeline.config import PARAMS_FILE, load_params

    print(yaml.safe_dump(load_params(args.params or PARAMS_FILE).model_dump(mode="json"), sort_keys=False))


def _log_model(args: argparse.Namespace) -> None:
    """Log a model.pt of either stage, checked by its own loader (weights only), in a run of its own."""
    import torch

    from pipeline import tracking_models
    from pipeline.config import PARAMS_FILE, load_params
    from pipeline.errors import PipelineError

    experiment = load_params(args.params or PARAMS_FILE).tracking.experiment
    path = Path(args.model)
    if not path.is_file():
        raise PipelineError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise PipelineError(f"{path}: not a readable model file ({type(err).__name__})") from None
    if isinstance(blob, dict) and blob.get("format") == "cifar10-classifier/1":
        from pipeline.classifier.model import load_classifier

        kind = "cifar10-classifier"
        load_classifier(path)
    else:
        from pipeline.compression.modelfile import model_from_checkpoint

        kind = "rnn-compressor"
        model_from_checkpoint(blob, str(path))
    run_id = tracking_models.log_model_file(path, kind, experiment, args.register)
    print(f"{args.model}: logged as a {kind} checkpoint in run {run_id}"
          + (f", registered as {args.register}" if args.register else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, module in _ordered(discover()).items():
        sub.add_parser(name, help=f"run stage {name} ({module}); {name} --help: its path options")
    conf = sub.add_parser("configure", help="set the profile and KEY=VALUE overrides in params.yaml")
    conf.add_argument("--profile", choices=PROFILES)
    conf.add_argument("--set", action="append", metavar="KEY=VALUE")
    conf.add_argument("--params", help="params file (default: params.yaml)")
    show = sub.add_parser("params", help="print the resolved params (profile applied)")
    show.add_argument("--params", help="params file (default: params.yaml)")
    logm = sub.add_parser("log-model", help="log a model file to MLflow as weights (e.g. to re-log one an "
                                            "earlier version logged as a pickle)")
    logm.add_argument("model", metavar="MODEL.pt", help="a model.pt of train_compressor or train_classifier")
    logm.add_argument("--register", metavar="NAME", help="register it in the Model Registry under NAME")
    logm.add_argument("--params", help="params file naming the MLflow experiment (default: params.yaml)")
    return parser


def _ordered(stages: dict[str, str]) -> dict[str, str]:
    """The found stages in dvc.yaml's order where it can be read (the help's listing), else as found."""
    try:
        order = list(dvc_commands())
    except PipelineError:
        order = []
    return dict(sorted(stages.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def stage_parser(name: str, module) -> argparse.ArgumentParser:
    """``python -m pipeline <name>``'s options: one ``--<path> PATH`` per name in the module's ``PATHS``, its
    default the path dvc.yaml's cmd gives (PipelineError when that cmd and ``PATHS`` disagree)."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {name}",
                                     description=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__
                                     else None)
    for key, default in defaults(module).items():
        parser.add_argument(option(key), dest=key, default=str(default), metavar="PATH",
                            help=f"default (dvc.yaml): {default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages, code = _value_or_exit(discover)
    if code:
        return code
    if not argv or argv[0] not in stages:
        args = build_parser().parse_args(argv)
        if args.command == "configure":
            return run_cli(lambda: _configure(args))
        if args.command == "log-model":
            return run_cli(lambda: _log_model(args))
        return run_cli(lambda: _show(args))
    name = argv[0]
    module = importlib.import_module(stages[name])
    parser, code = _value_or_exit(lambda: stage_parser(name, module))  # dvc.yaml's paths
    if code:
        return code
    paths = StagePaths(vars(parser.parse_args(argv[1:])))
    restore = _interrupt_on_sigterm()
    try:
        return run_cli(lambda: run_stage(name, module, paths))
    finally:
        restore()


def _value_or_exit(make):
    """``(make(), 0)``, or ``(None, exit code)`` after ``run_cli`` printed its error in one line."""
    box = []
    code = run_cli(lambda: box.append(make()))
    return (box[0], 0) if box else (None, code)


def run_stage(name: str, module, paths: StagePaths) -> None:
    """Steps 2-4 of the contract (pipeline/stage.py): params once, the MLflow run once, ``run(params, paths)``."""
    import os

    from pipeline.distributed import under_torchrun

    if not under_torchrun():  # the launching (or only) process
        from pipeline.cleanup import clean_stage

        clean_stage(name)  # temporaries a killed run of this stage left
    from pipeline import tracking
    from pipeline.config import load_params

    params = load_params()
    if not under_torchrun():
        from pipeline import events

        datasets = {label: paths[key] for key, label in getattr(module, "DATASETS", {}).items()}
        with tracking.stage_run(name, params, tuple(module.SECTIONS), datasets):
            module.run(params, paths)
        events.emit("stage_done", stage=name)  # it ran (DVC did not find it up to date): make run's console
    elif int(os.environ.get("RANK", "0")) == 0 and os.environ.get(tracking.RUN_ID_ENV):
        with tracking.joined_run(os.environ[tracking.RUN_ID_ENV]):
            module.run(params, paths)
    else:  # a rank other than 0: it trains, it does not log
        os.environ.pop(tracking.RUN_ID_ENV, None)
        module.run(params, paths)


def _interrupt_on_sigterm():
    """A stage stopped by SIGTERM (its Airflow task killed, timed out or orphaned) unwinds like Ctrl-C:
    temporary files are removed and its MLflow run is closed as KILLED instead of left RUNNING."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
