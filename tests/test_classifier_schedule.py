"""Learning-rate schedules: the coursework's sawtooth and the fast recipe's triangle."""

import pytest

from pipeline.classifier.params import TrainClassifierParams
from pipeline.classifier.recipes import fast_lr_factor, sawtooth


def test_sawtooth_values():
    lrs = sawtooth(0.001, 0.0001, 9, 3)
    assert lrs == pytest.approx([0.001, 0.00055, 0.0001] * 3)


def test_sawtooth_coursework_shape():
    lrs = sawtooth(0.001, 0.0001, 300, 3)
    assert len(lrs) == 300
    for start in (0, 100, 200):  # three teeth of 100 epochs: restart at the peak, end at the trough
        assert lrs[start] == pytest.approx(0.001)
        assert lrs[start + 99] == pytest.approx(0.0001)
        tooth = lrs[start:start + 100]
        assert all(a > b for a, b in zip(tooth, tooth[1:]))  # strictly decreasing inside a tooth
    assert lrs[50] == pytest.approx(0.001 - 0.0009 * 50 / 99)


def test_sawtooth_uneven_and_single_tooth():
    assert sawtooth(1.0, 0.0, 5, 2) == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.5])  # last tooth cut short
    assert sawtooth(1.0, 0.0, 3, 1) == pytest.approx([1.0, 0.5, 0.0])
    assert sawtooth(1.0, 0.5, 1, 1) == [1.0]


def test_fast_lr_triangle():
    total = 100
    assert fast_lr_factor(0, total, 0.23, 0.07) == pytest.approx(0.2)
    assert fast_lr_factor(23, total, 0.23, 0.07) == pytest.approx(1.0)
    assert fast_lr_factor(100, total, 0.23, 0.07) == pytest.approx(0.07)
    assert fast_lr_factor(10, total, 0.0, 0.0) == pytest.approx(0.9)  # no warm-up


def test_coursework_needs_whole_epochs():
    with pytest.raises(ValueError, match="whole number"):
        TrainClassifierParams(recipe="coursework", epochs=2.5)
    assert TrainClassifierParams(recipe="fast", epochs=2.5).epochs == 2.5
