"""Two stages in separate working copies that share only the DVC remote (no shared disk)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_workspace


def _run(ws, *args, env=None):
    proc = subprocess.run([sys.executable, "-m", "pipeline.orchestration.remote_exec", *args], cwd=ws,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_stages_in_separate_copies_share_only_the_remote(tmp_path, mirror):
    remote = tmp_path / "remote"
    copies = []
    for name in ("worker_a", "worker_b"):
        ws = make_workspace(tmp_path / name, git=True)
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-f", "-d", "shared", str(remote)],
                       cwd=ws, check=True, capture_output=True)
        copies.append(ws)
    a, b = copies
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    entry = _run(a, "download", env={**env, "DATA_MIRROR": str(mirror)})
    assert "download" in json.loads(entry)
    assert remote.is_dir() and any(remote.rglob("*"))

    env_b = {k: v for k, v in env.items() if k != "DATA_MIRROR"}  # B cannot download anything itself
    out = _run(b, "augment", "--upstream", entry, env=env_b)
    assert "augment" in json.loads(out)
    assert (b / "data/prepared/cifar10.npz").is_file()
    assert (b / "data/raw/cifar-10-batches-py/test_batch").is_file()  # pulled from the remote
    assert not (b / "data/raw/kodak").exists()  # only what augment depends on
    assert not (b / ".cache").exists()
