"""``python -m pipeline <stage>``: run one pipeline stage (dvc.yaml calls exactly this).

Also ``python -m pipeline configure [--profile P] [--set KEY=VALUE ...]`` (write params.yaml)
and ``python -m pipeline params`` (print the resolved params as YAML).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import run_cli

#: stage name -> "module:function"; dvc.yaml runs each as ``python -m pipeline <stage>``
STAGES = {
    "download": "pipeline.data.download:main",
    "augment": "pipeline.data.augment:main",
    "train_classifier": "pipeline.classifier.train:main",
    "train_compressor": "pipeline.compression.train:main",
    "evaluate": "pipeline.evaluation.evaluate:main",
    "report": "pipeline.report.build:main",
}


def _configure(args: argparse.Namespace) -> None:
    from pipeline.config import PARAMS_FILE, set_params

    changed = set_params(args.params or PARAMS_FILE, args.profile, args.set or [])
    print("params.yaml updated" if changed else "params.yaml unchanged")


def _show(args: argparse.Namespace) -> None:
    import yaml

    from pipeline.config import PARAMS_FILE, load_params

    print(yaml.safe_dump(load_params(args.params or PARAMS_FILE).model_dump(mode="json"), sort_keys=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, target in STAGES.items():
        sub.add_parser(name, help=f"run stage {name} ({target})")
    conf = sub.add_parser("configure", help="set the profile and KEY=VALUE overrides in params.yaml")
    conf.add_argument("--profile", choices=["cpu", "gpu", "coursework", "tiny"])
    conf.add_argument("--set", action="append", metavar="KEY=VALUE")
    conf.add_argument("--params", help="params file (default: params.yaml)")
    show = sub.add_parser("params", help="print the resolved params (profile applied)")
    show.add_argument("--params", help="params file (default: params.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "configure":
        return run_cli(lambda: _configure(args))
    if args.command == "params":
        return run_cli(lambda: _show(args))
    module, func = STAGES[args.command].split(":")
    restore = _interrupt_on_sigterm()

    def stage() -> None:
        import os

        if "LOCAL_RANK" not in os.environ:  # not a torchrun rank: the launching (or only) process
            from pipeline.cleanup import clean_stage

            clean_stage(args.command)  # temporaries a killed run of this stage left
        getattr(importlib.import_module(module), func)()

    try:
        return run_cli(stage)
    finally:
        restore()


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
