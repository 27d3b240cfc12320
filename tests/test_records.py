"""Typed records between stages (pipeline/records.py): what is written is read back, typed."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pipeline.errors import PipelineError
from pipeline.records import (AtRate, BDRate, CurvePoint, EvaluationSummary, Pairwise, by_codec, read_csv, read_table,
                              write_table)


def test_a_table_round_trips_with_its_types(tmp_path):
    rows = [CurvePoint("jpeg", "quality", 50.0, 3, 0.123456789, 0.9, 10.0, 30.0, 0.8, 0.01, 0.002),
            CurvePoint("rnn", "iterations", 2.0, 3, 0.25, float("nan"), 9.0, 28.5, 0.7, 0.5, 0.25)]
    write_table(tmp_path / "c.csv", rows)
    text = (tmp_path / "c.csv").read_text().splitlines()
    assert text[0] == ",".join(f.name for f in dataclasses.fields(CurvePoint))
    assert text[1].startswith("jpeg,quality,50,3,0.123457,")  # floats as %.6g, ints as they are
    back = read_table(tmp_path / "c.csv", CurvePoint)
    assert back[0].images == 3 and isinstance(back[0].images, int) and back[0].bpp == 0.123457
    assert math.isnan(back[1].ms_ssim) and back[1].codec == "rnn"
    assert [r.codec for r in by_codec(back)["rnn"]] == ["rnn"]
    assert read_csv(tmp_path / "c.csv")[0]["images"] == 3.0  # the untyped reader: numbers as floats


def test_strings_stay_strings(tmp_path):
    row = Pairwise("jpeg", "rnn", 0.25, "ms_ssim", 4, 1, 3, -0.01, -0.02, 0.0, "not shown")
    write_table(tmp_path / "p.csv", [row])
    assert read_table(tmp_path / "p.csv", Pairwise) == [row]


def test_a_missing_column_or_file_is_one_clear_error(tmp_path):
    write_table(tmp_path / "c.csv", [CurvePoint("jpeg", "quality", 50.0, 3, 0.1, 0.9, 10.0, 30.0, 0.8, 0.0, 0.0)])
    with pytest.raises(PipelineError, match=r"c.csv: no column .*ms_ssim_lo.*AtRate"):
        read_table(tmp_path / "c.csv", AtRate)
    with pytest.raises(PipelineError, match="nope.csv: missing"):
        read_table(tmp_path / "nope.csv", BDRate)


def test_an_empty_table_reads_as_no_rows(tmp_path):
    write_table(tmp_path / "bd.csv", [])  # one codec: no BD pair
    assert read_table(tmp_path / "bd.csv", BDRate) == []


def test_a_wrong_key_fails_at_the_writer():
    with pytest.raises(TypeError):
        AtRate(codec="jpeg", bpp=0.25, msssim=0.9)  # a renamed column cannot be written


def test_a_summary_with_a_missing_or_unknown_key_is_refused(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"profile": "tiny"}')
    with pytest.raises(PipelineError, match="summary.json: not an evaluation summary"):
        EvaluationSummary.read(path)
