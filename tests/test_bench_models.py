"""bench/bench_models.py: two codec models compared at equal real file size."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("bench_models",
                                              Path(__file__).resolve().parents[1] / "bench" / "bench_models.py")
bench_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_models)


def rd_curve(rate_scale: float = 1.0, psnr_shift: float = 0.0) -> dict:
    """A made-up rate-quality curve of 8 iterations; ``rate_scale`` < 1: the same quality in fewer bytes."""
    bpp = np.linspace(0.08, 0.9, 8)
    ms = 1 - 0.2 * np.exp(-5 * bpp)
    return {"bpp": list(bpp * rate_scale), "ms_ssim": list(ms), "ms_ssim_db": list(-10 * np.log10(1 - ms)),
            "psnr": list(22 + 8 * bpp + psnr_shift)}


def test_a_model_against_itself_is_even():
    row = bench_models.compare(rd_curve(), rd_curve())
    assert all(v == pytest.approx(0, abs=1e-9) for v in row.values())


def test_the_same_quality_in_fewer_bytes_is_a_negative_bd_rate_and_higher_quality_at_each_rate():
    row = bench_models.compare(rd_curve(), rd_curve(rate_scale=0.9, psnr_shift=0.5))
    assert row["bd_rate_msssim_db"] == pytest.approx(-10.0, abs=0.2)
    assert row["ms_ssim@0.25"] > 0 and row["ms_ssim@0.5"] > 0
    assert row["psnr@0.25"] > 0.5  # its own shift plus the rate saving
    assert np.isfinite(row["ms_ssim@0.125"])
