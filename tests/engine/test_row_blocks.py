"""Large layers quantized in blocks of rows (engine/apply.py ``_row_pieces``): the same codes, scales
and report as one call on the whole weight, for the deterministic methods; frame weights stay whole."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import specquant as sq
import specquant.engine.apply as apply_mod
from specquant.algorithms import FrameConfig, GPFQConfig, GPTQConfig, QronosConfig, RTNConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 96)).eval()  # the head: 96 rows × 40


def _x():
    return torch.randn(256, 24, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cfg", [RTNConfig(bits=3, granularity="group:8", symmetric=False),
                                 GPTQConfig(bits=3, granularity="group:8", symmetric=False),
                                 GPTQConfig(bits=2),
                                 GPFQConfig(bits=3, bias_correction=True),
                                 QronosConfig(bits=3, granularity="group:16", symmetric=False)],
                         ids=["rtn-g8", "gptq-g8", "gptq-channel", "gpfq-bias", "qronos-g16"])
def test_blocks_of_rows_give_the_whole_layers_result(cfg, monkeypatch):
    whole, blocked = _net(), _net()
    ref = sq.quantize(whole, copy.deepcopy(cfg), calib=_x(), progress=False)
    calls = []
    real = apply_mod._run
    monkeypatch.setattr(apply_mod, "_run", lambda m, W, *a: calls.append(W.shape[0]) or real(m, W, *a))
    monkeypatch.setattr(apply_mod, "ROW_BLOCK_BYTES", 8 * 40 * 30)  # the head in blocks of 30 rows
    rep = sq.quantize(blocked, copy.deepcopy(cfg), calib=_x(), progress=False)
    assert calls == [40, 30, 30, 30, 6]  # the first layer (40 × 24 fits) whole, the head in 4 blocks
    for a, b in ((whole[0], blocked[0]), (whole[2], blocked[2])):
        qa, qb = a.qweight, b.qweight
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale)
        assert torch.equal(qa.zero_point, qb.zero_point) and qa.spec == qb.spec and qa.granularity == qb.granularity
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    for ra, rb in zip(ref.layers, rep.layers):
        assert ra.rel_output_error == pytest.approx(rb.rel_output_error, rel=1e-9)
        assert ra.weight_sqnr_db == pytest.approx(rb.weight_sqnr_db, rel=1e-9)
    with torch.no_grad():
        assert torch.equal(whole(_x()), blocked(_x()))


def test_per_tensor_scales_and_frame_weights_are_not_cut(monkeypatch):
    monkeypatch.setattr(apply_mod, "ROW_BLOCK_BYTES", 8 * 40 * 30)
    calls = []
    real = apply_mod._run
    monkeypatch.setattr(apply_mod, "_run", lambda m, W, *a: calls.append(W.shape[0]) or real(m, W, *a))
    sq.quantize(_net(), RTNConfig(bits=4, granularity="tensor"), calib=_x(), progress=False)
    assert calls == [40, 96]  # one scale for the whole tensor: never cut
    calls.clear()
    net = _net()
    sq.quantize(net, FrameConfig(bits=3), calib=_x(), progress=False)
    assert calls[0] == 40 and calls[-1] == 96  # the frame result of a block is not assembled: the head redone whole
    with torch.no_grad():
        assert torch.isfinite(net(_x())).all()
