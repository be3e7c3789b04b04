"""Per-class accuracy and the disparity of the per-class drop (hand examples)."""
from __future__ import annotations

import pytest
import torch

from specquant.eval.classify import class_drop, per_class_accuracy


def test_per_class_accuracy_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    acc = per_class_accuracy(pred, labels, 3)
    assert acc.tolist() == [75.0, 50.0, 100.0]
    # balanced classes: the mean of per-class accuracies is the overall accuracy
    lb = torch.tensor([0, 0, 1, 1])
    pb = torch.tensor([0, 1, 1, 1])
    assert float(per_class_accuracy(pb, lb, 2).mean()) == 100.0 * float((pb == lb).double().mean())


def test_disparity_by_hand():
    ref = torch.tensor([90.0, 80.0, 70.0, 100.0])
    got = torch.tensor([88.0, 78.0, 62.0, 100.0])  # drops 2, 2, 8, 0: mean 3, worst 8 (class 2)
    d = class_drop(ref, got)
    assert d.drops == (2.0, 2.0, 8.0, 0.0)
    assert d.mean_drop == 3.0 and d.worst_drop == 8.0 and d.worst_class == 2
    assert d.disparity == pytest.approx(8.0 / 3.0)
    # an even drop has disparity exactly 1, the smallest possible value
    assert class_drop(ref, ref - 5.0).disparity == pytest.approx(1.0)
    # no mean drop: undefined, not a division by zero
    assert class_drop(ref, ref).disparity is None
    assert class_drop(ref, ref + 1.0).disparity is None


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no sample"):
        per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        per_class_accuracy(torch.tensor([0, 5]), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="1-D of one length"):
        per_class_accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="per-class accuracies"):
        class_drop(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))


def test_bootstrap_interval_is_seeded_and_holds_the_estimate():
    from specquant.eval.classify import bootstrap_disparity

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(200)  # (800,) four balanced classes
    ref = labels.clone()
    pred = labels.clone()
    wrong = torch.rand(800, generator=g) < torch.tensor([0.05, 0.05, 0.05, 0.30]).repeat_interleave(200)
    pred[wrong] = (labels[wrong] + 1) % 4  # class 3 loses ~30 points, the others ~5
    point = class_drop(per_class_accuracy(ref, labels, 4), per_class_accuracy(pred, labels, 4)).disparity
    lo, hi = bootstrap_disparity(ref, pred, labels, 4, reps=100, seed=1)
    assert lo <= point <= hi and 1.0 <= lo
    assert bootstrap_disparity(ref, pred, labels, 4, reps=100, seed=1) == (lo, hi)
    # no drop at all: no interval
    assert bootstrap_disparity(ref, ref, labels, 4, reps=20) is None
