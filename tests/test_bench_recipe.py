"""bench/bench_recipe.py, the equal-wall-time recipe comparison: variants, the time-based schedule, a tiny run."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

spec = importlib.util.spec_from_file_location("bench_recipe",
                                              Path(__file__).resolve().parents[1] / "bench" / "bench_recipe.py")
bench_recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_recipe)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_variants_parse_values_as_yaml_and_keep_brackets_whole():
    name, over = bench_recipe.parse_variant("narrow:encoder_widths=[8,32,64,64],lr=0.002,loss=l2,ema_decay=null")
    assert name == "narrow"
    assert over == {"encoder_widths": [8, 32, 64, 64], "lr": 0.002, "loss": "l2", "ema_decay": None}
    assert bench_recipe.parse_variant("base") == ("base", {})
    with pytest.raises(SystemExit, match="key=value"):
        bench_recipe.parse_variant("bad:lr")


def test_schedule_follows_its_clock():
    from pipeline.compression.params import TrainCompressorParams

    now = [100.0]
    p = TrainCompressorParams(lr=0.01, lr_schedule="cosine", lr_warmup=0.0, lr_floor=0.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=p.lr)
    sched = bench_recipe.TimeSchedule(opt, p, budget_s=60.0, clock=lambda: now[0])  # wall or CPU time (--clock)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    now[0] = 130.0  # half the budget: half-way down the cosine
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005, rel=1e-3)
    now[0] = 1000.0  # past the budget: the end of the schedule
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-6)


def test_tiny_comparison_writes_one_scored_line_per_variant(tmp_path):
    rng = np.random.default_rng(0)
    patches = tmp_path / "patches.npz"
    np.savez(patches, train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             val=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    for n in (4, 7):  # MS-SSIM's five scales need more than 160 px a side
        Image.fromarray(rng.integers(0, 256, (176, 192, 3), dtype=np.uint8)).save(kodak / f"kodim{n:02d}.png")
    out = tmp_path / "r.jsonl"
    tiny = json.dumps({"encoder_widths": [8, 16, 16, 16], "decoder_widths": [16, 16, 16, 16], "batch_size": 4})
    assert bench_recipe.main(["--minutes", "0.01", "--patches", str(patches), "--kodak", str(kodak), "--images", "4,7",
                              "--base", tiny, "--variant", "a", "--variant", "b:iterations=2,cell=lstm",
                              "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert rows[0]["steps"] > 0 and rows[0]["recipe"]["batch_size"] == 4
    assert set(rows[0]["kodak_ms_ssim"]) == {"1", "2", "4", "8"} and set(rows[1]["kodak_ms_ssim"]) == {"1", "2"}
    assert rows[0]["recipe"]["cell"] == "gru"  # the base recipe's cell, as the cpu profile's
    assert rows[1]["recipe"]["cell"] == "lstm" and rows[1]["parameters"] > rows[0]["parameters"]  # 4 gates, not 3
    assert all(0 < v <= 1 for r in rows for v in r["kodak_ms_ssim"].values())


def test_a_bad_variant_stops_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match="variant 'bad'"):
        bench_recipe.main(["--patches", str(tmp_path / "none.npz"), "--kodak", str(tmp_path), "--images", "all",
                           "--variant", "ok", "--variant", "bad:lr=-1"])
    with pytest.raises(SystemExit, match="kodim09.png"):
        bench_recipe.main(["--kodak", str(tmp_path), "--images", "9", "--variant", "ok"])
