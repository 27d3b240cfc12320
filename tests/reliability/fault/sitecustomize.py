"""Fault injection for tests/reliability: a real SIGKILL at an exact point of one pipeline stage.

Put this folder on PYTHONPATH and set ``PIPELINE_FAULT="<stage> <kind> <arg> <n>"``: the Python process
running ``python -m pipeline <stage>`` (started by DVC or directly) kills itself with SIGKILL, as
``kill -9`` would, at the n-th occurrence of the event. Every other process ignores it. Kinds:

- ``step - n``: after the n-th optimiser step (torch's global optimiser step hook): mid-epoch;
- ``save-half NAME n``: in the n-th ``torch.save`` to a file whose name contains NAME, after writing
  half of its bytes: a half-written checkpoint or model;
- ``replace NAME n``: at the n-th ``os.replace`` onto a path named NAME, before the rename: an output
  complete under its temporary name;
- ``extract - n``: after the n-th file member a tarball extraction wrote: mid-extraction;
- ``call MODULE:ATTR n``: on the n-th call of that function (e.g. MLflow logging after the outputs).

With ``PIPELINE_FAULT_LOG`` set, one JSON line is appended to that file just before the kill: the
spec and what was in progress (the temporary file half-written or complete, the member extracted...),
so a test knows the process died at that point and not elsewhere.

``PIPELINE_FAULT_ACTION=hold``: at the point, record it and wait there (until a signal ends the
process) instead of dying: a test can then kill something else (the orchestrator) while the stage is
known to be exactly there.
"""

import json
import os
import signal
import sys


def _die(**detail):
    record = os.environ.get("PIPELINE_FAULT_LOG")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"fault": os.environ.get("PIPELINE_FAULT", ""), "pid": os.getpid(), **detail}) + "\n")
    if os.environ.get("PIPELINE_FAULT_ACTION") == "hold":
        import time

        while True:  # a SIGTERM handler's exception (KeyboardInterrupt) unwinds from here
            time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _install(stage, kind, arg, n):
    count = [0]

    def hit():
        count[0] += 1
        return count[0] == n

    if kind == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda opt, args, kwargs: hit() and _die(step=count[0]))
    elif kind == "save-half":
        import io

        import torch

        real_save = torch.save

        def save(obj, f, *a, **k):
            path = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)  # a path or an open file
            if isinstance(path, (str, os.PathLike)) and arg in os.path.basename(str(path)) and hit():
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                data = buf.getvalue()
                if path is f:
                    with open(f, "wb") as out:
                        out.write(data[: len(data) // 2])
                else:
                    f.write(data[: len(data) // 2])
                    f.flush()
                _die(path=os.path.abspath(str(path)), written=len(data) // 2, size=len(data))
            return real_save(obj, f, *a, **k)

        torch.save = save
    elif kind == "replace":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if os.path.basename(str(dst)) == arg and hit():
                _die(path=os.path.abspath(str(src)), target=os.path.abspath(str(dst)))
            return real_replace(src, dst, *a, **k)

        os.replace = replace
    elif kind == "extract":
        import tarfile

        real_makefile = tarfile.TarFile.makefile

        def makefile(self, tarinfo, targetpath):
            real_makefile(self, tarinfo, targetpath)
            if hit():
                _die(path=os.path.abspath(str(targetpath)), member=tarinfo.name)

        tarfile.TarFile.makefile = makefile
    elif kind == "call":
        import importlib

        module, attr = arg.rsplit(":", 1)
        owner = importlib.import_module(module)
        real = getattr(owner, attr)

        def wrapper(*a, **k):
            if hit():
                _die(call=arg)
            return real(*a, **k)

        setattr(owner, attr, wrapper)
    else:
        raise ValueError(f"PIPELINE_FAULT: unknown kind {kind!r}")


_spec = os.environ.get("PIPELINE_FAULT", "").split()
_argv = getattr(sys, "orig_argv", sys.argv)
_at = _argv.index("pipeline") if "pipeline" in _argv else -1
if len(_spec) == 4 and _at > 0 and _argv[_at - 1] == "-m" and _argv[_at + 1:_at + 2] == [_spec[0]] \
        and "RANK" not in os.environ:  # `python -m pipeline <stage> [--path P ...]`, not a torchrun rank
    try:
        _install(_spec[0], _spec[1], _spec[2], int(_spec[3]))
    except Exception as err:  # never let the stage run unharmed when the fault could not be set
        print(f"PIPELINE_FAULT: cannot install {_spec}: {err!r}", file=sys.stderr, flush=True)
        os._exit(99)
