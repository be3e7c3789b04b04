"""MLP and its deterministic trainer (on scikit-learn's digits, offline)."""
from __future__ import annotations

import pytest
import torch

from specquant.models.data import load_digits_split
from specquant.models.mlp import MLP, train_mlp


def test_mlp_layers_and_shapes():
    model = MLP([64, 32, 16, 10])
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear_names == ["fc1", "fc2", "fc3"]
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # inputs are flattened
    with pytest.raises(ValueError):
        MLP([10])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_mlp_is_deterministic_and_learns(optimizer):
    xtr, ytr, xte, yte = load_digits_split()
    lr = 5e-3 if optimizer == "adam" else 0.05
    a = train_mlp(MLP([64, 32, 10]), xtr, ytr, epochs=5, lr=lr, batch_size=64, seed=3, optimizer=optimizer)
    torch.manual_seed(1234)  # the global RNG state before the call must not matter
    b = train_mlp(MLP([64, 32, 10]), xtr, ytr, epochs=5, lr=lr, batch_size=64, seed=3, optimizer=optimizer)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not a.training
    with torch.no_grad():
        acc = (a(xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.85
    c = train_mlp(MLP([64, 32, 10]), xtr, ytr, epochs=5, lr=lr, batch_size=64, seed=4, optimizer=optimizer)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_train_mlp_bad_arguments():
    x, y = torch.randn(10, 4), torch.zeros(9, dtype=torch.int64)
    with pytest.raises(ValueError, match="labels"):
        train_mlp(MLP([4, 2]), x, y)
    with pytest.raises(ValueError, match="optimizer"):
        train_mlp(MLP([4, 2]), x, torch.zeros(10, dtype=torch.int64), optimizer="rmsprop")


def test_train_mlp_restores_thread_count():
    xtr, ytr, _, _ = load_digits_split()
    before = torch.get_num_threads()
    train_mlp(MLP([64, 10]), xtr[:64], ytr[:64], epochs=1, threads=1)
    assert torch.get_num_threads() == before
