"""GPTQ's per-channel step search: the step that is best for round-to-nearest is not the best
for GPTQ, and choosing among candidates by the float-target output error ‖Xw − X̃ŵ‖ can only
lower it, channel by channel, below GPTQ on the unsearched step and on the max-abs step."""
import dataclasses

import pytest
import torch

from specquant.algorithms import GPTQConfig, gptq


def _row_err(W, W_hat, X, Xt):
    """‖X w_i − X̃ ŵ_i‖² per output channel i."""
    return ((X.double() @ W.double().T - Xt.double() @ W_hat.double().T) ** 2).sum(0)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act_order", [True, False])
def test_search_never_worse_than_either_grid_per_channel(layer_data, stats_from, bits, act_order):
    W, X, Xt = layer_data  # correlated ReLU inputs, X̃ ≠ X (error carried in from earlier layers)
    s = stats_from(X, Xt)
    cfg = GPTQConfig(bits=bits, act_order=act_order)
    searched = _row_err(W, gptq.quantize_weight(W, s, cfg).dequantize(), X, Xt)
    for rule in ("output-mse", "minmax"):  # the old default's step and Brevitas' (max-abs) step
        plain = _row_err(W, gptq.quantize_weight(W, s, dataclasses.replace(cfg, scale_rule=rule, search=()))
                         .dequantize(), X, Xt)
        assert bool((searched <= plain * (1 + 1e-9)).all()), rule


def test_rtn_best_step_is_not_gptq_best_step(layer_data, stats_from):
    """The cause: at 2 bits the search moves some channels off the RTN-optimal step, and the
    output error drops below the old default (no search)."""
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    old = gptq.quantize_weight(W, s, GPTQConfig(bits=2, search=()))
    new = gptq.quantize_weight(W, s, GPTQConfig(bits=2))
    moved = (new.scale != old.scale).double().mean()
    assert moved > 0
    e_old = _row_err(W, old.dequantize(), X, Xt).sum()
    e_new = _row_err(W, new.dequantize(), X, Xt).sum()
    assert e_new < e_old


def test_search_codes_fit_stored_float16_scales(layer_data, stats_from):
    """With float16 scales every candidate step is rounded first: dequantized = codes × stored scale."""
    W, X, Xt = layer_data
    qw = gptq.quantize_weight(W, stats_from(X, Xt), GPTQConfig(bits=2, scale_dtype="float16"))
    assert torch.equal(qw.scale, qw.scale.half().float())
    assert qw.info["search"] == [0.8, 0.9, 1.1, 1.25]


def test_no_search_for_groups(layer_data, stats_from):
    """The search is per output channel; grouped grids keep the rule's steps (as GPFQ)."""
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    a = gptq.quantize_weight(W, s, GPTQConfig(bits=3, granularity="group:16"))
    b = gptq.quantize_weight(W, s, GPTQConfig(bits=3, granularity="group:16", search=()))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
