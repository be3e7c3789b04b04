"""Diagnostics behind the run-folder plots: κ per layer and the frame ΣΔ redundancy sweep."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from specquant.diagnostics.sweeps import frame_redundancy_sweep, layer_kappas


def test_frame_sweep_error_falls_with_redundancy_and_storage_grows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    before = [p.detach().clone() for p in model.parameters()]
    sw = frame_redundancy_sweep(model, 2, (1.0, 2.0, 4.0))
    assert sw["redundancy"] == [1.0, 2.0, 4.0] and set(sw["layers"]) == {"0", "2"}
    assert sw["overall"][0] > sw["overall"][1] > sw["overall"][2] > 0
    assert sw["bits_per_weight"][0] < sw["bits_per_weight"][1] < sw["bits_per_weight"][2]
    assert sw["bits_per_weight"][2] == pytest.approx(2 * 4.0, rel=0.2)  # b·N/d plus the scales
    for p, q in zip(model.parameters(), before):  # a diagnostic changes nothing
        assert torch.equal(p, q)


def test_layer_kappas_match_the_singular_values():
    lin = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([4.0, 2.0, 0.5])))
    model = nn.Sequential(lin)
    assert layer_kappas(model, ["0"])["0"] == pytest.approx(8.0)
