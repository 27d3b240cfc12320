"""DistributedDataParallel on CPU (gloo, 2 processes) equals one process on the whole batch."""

import subprocess
import sys

import pytest
import torch

from pipeline.distributed import Dist
from tests.conftest import REPO


def test_shards_cover_the_batch_once():
    for n in (1, 7, 8, 64):
        parts = [Dist(rank=r, world_size=3).shard(n) for r in range(3)]
        covered = [i for p in parts for i in range(n)[p]]
        assert covered == list(range(n))


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    from tests._ddp_worker import train

    single = tmp_path / "single.pt"
    train(str(single))
    multi = tmp_path / "multi.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "_ddp_worker.py"), str(multi)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(single), torch.load(multi)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
