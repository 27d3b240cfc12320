"""bench/bench_gpu.py, the prepared check for a lent GPU: its params and sizing, checked where there is none."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_gpu)


def test_overrides_win_over_the_profiles_own_values():
    # the gpu profile sets epochs 30 and patches_per_epoch null itself: a budgeted run must still get its own
    p = bench_gpu.params_for("gpu", {"train_compressor": {"epochs": 1, "patches_per_epoch": 512}}).train_compressor
    assert (p.epochs, p.patches_per_epoch, p.iterations, p.batch_size) == (1, 512, 16, 256)
    c = bench_gpu.params_for("cpu", {"train_compressor": {"epochs": 2}, "augment": {"patches": 1234}})
    assert (c.train_compressor.epochs, c.train_compressor.iterations, c.augment.patches) == (2, 16, 1234)


def test_sized_fills_the_budget_in_whole_batches():
    epochs, per_epoch = bench_gpu.sized(probe_patches_per_s=1000.0, seconds=120.0, batch=256, epoch_s=10.0)
    assert epochs == 12 and per_epoch % 256 == 0
    assert 0.97 * 120_000 <= epochs * per_epoch <= 120_000
    assert bench_gpu.sized(0.01, 1.0, 8, 1.0) == (1, 8)  # never an empty epoch
