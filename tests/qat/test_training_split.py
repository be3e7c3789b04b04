"""The zoo's training splits (``ZooEntry.train``), which QAT fine-tunes on: labelled, and never the test set."""
from __future__ import annotations

import torch

from specquant.models import get_entry


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """No sample of ``a`` equals a sample of ``b`` (compared through a per-sample checksum, then exactly)."""
    ka = {round(float(v), 3): i for i, v in enumerate(a.flatten(1).double().sum(1) * 1e3 % 1e6)}
    for j, v in enumerate(b.flatten(1).double().sum(1) * 1e3 % 1e6):
        i = ka.get(round(float(v), 3))
        if i is not None and torch.equal(a[i], b[j]):
            return False
    return True


def test_digits_training_split_is_labelled_and_not_the_test_set():
    e = get_entry("digits-mlp")
    x, y = e.train(None)
    xt, _ = e.test(None)
    assert x.shape == (1437, 64) and y.shape == (1437,) and y.dtype == torch.int64
    assert _disjoint(x, xt)


def test_cifar_training_split_is_train_10k(data_dir):
    e = get_entry("resnet20-cifar10")
    x, y = e.train(data_dir)
    xt, _ = e.test(data_dir)
    assert x.shape == (10000, 3, 32, 32) and torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert _disjoint(x[:2000], xt)
    assert get_entry("resnet32-cifar10").train is e.train
