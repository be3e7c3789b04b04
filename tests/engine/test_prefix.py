"""Prefix models (engine/prefix.py): k = 0 is the float model, k = L the quantized one, and for a
sequential method the prefix of one full run equals quantizing only those layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from specquant.algorithms import GPFQConfig, ModuleSettings, RTNConfig
from specquant.engine.apply import quantize
from specquant.engine.prefix import prefix_model
from specquant.engine.walk import fold_batchnorm


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


def setup(config):
    torch.manual_seed(0)
    model = Res().eval()
    with torch.no_grad():  # a BN that is not the identity, so folding matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(48, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    fold_batchnorm(model, x[:2])
    q = copy.deepcopy(model)
    report = quantize(q, config, x, progress=False)
    return model, q, [r.name for r in report.layers], x


@pytest.mark.parametrize("config", [RTNConfig(bits=2), GPFQConfig(bits=2, seed=3)])
def test_k0_is_float_and_kL_is_the_quantized_model_exactly(config):
    ref, q, layers, x = setup(config)
    assert layers == ["stem", "a", "b", "fc"]
    with torch.no_grad():
        y_ref, y_q = ref(x), q(x)
        assert torch.equal(prefix_model(ref, q, layers, 0)(x), y_ref)
        assert torch.equal(prefix_model(ref, q, layers, len(layers))(x), y_q)
        assert not torch.equal(y_ref, y_q)
    p2 = prefix_model(ref, q, layers, 2)
    assert torch.equal(p2.a.weight, q.a.weight) and torch.equal(p2.b.weight, ref.b.weight)
    assert p2.a.qweight is q.a.qweight and not hasattr(p2.b, "qweight")
    assert not hasattr(ref.a, "qweight")  # the inputs are not changed


def test_a_sequential_prefix_equals_quantizing_only_the_prefix():
    """GPFQ's layer j depends only on the layers before it: the prefix of one full run is the model
    quantized with every later layer left in float (the premise of the depth benchmark)."""
    ref, q, layers, x = setup(GPFQConfig(bits=2, seed=3))
    for k in (1, 2, 3):
        only = copy.deepcopy(ref)
        skip = {name: ModuleSettings(skip=True) for name in layers[k:]}
        quantize(only, GPFQConfig(bits=2, seed=3, modules=skip), x, progress=False)
        pk = prefix_model(ref, q, layers, k)
        a, b = dict(pk.named_modules()), dict(only.named_modules())
        for name in layers:
            assert torch.equal(a[name].weight, b[name].weight), (k, name)


def test_bad_prefix_arguments_are_one_line_errors():
    ref, q, layers, _ = setup(RTNConfig(bits=2))
    with pytest.raises(ValueError, match=r"integer in \[0, 4\], got 5"):
        prefix_model(ref, q, layers, 5)
    with pytest.raises(ValueError, match="layer 'nope' is not a module of the reference model"):
        prefix_model(ref, q, ["nope"], 1)
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"layer '0': weight shape \(3, 3\)"):
        prefix_model(nn.Sequential(nn.Linear(3, 2)), other, ["0"], 1)
