"""AWQ's α search (algorithms/awq.py) against what it promises: α = 0 is plain rounding and is on
the grid, so the chosen scales never do worse than RTN on the output error; on inputs with a few
large-magnitude channels the scales lower that error clearly; the search is deterministic; and
its loss is exactly the error of rounding the scaled weights and feeding them the scaled input."""
import json

import pytest
import torch

from specquant.algorithms import AWQConfig, GPTQConfig, RTNConfig, make_config, method_choices
from specquant.algorithms.awq import (
    activation_scale,
    alpha_grid,
    awq_scales,
    rtn_fake_quant,
    scales_for,
    search_quantizer,
)
from specquant.algorithms.base import LayerStats
from specquant.algorithms.common import row_output_error
from specquant.algorithms.rtn import quantize_weight as rtn_quantize_weight


def _stats(X: torch.Tensor) -> LayerStats:
    X = X.double()
    F = X.T @ X
    return LayerStats(H=F, G=F, F=F, n_rows=X.shape[0], mean_x=X.mean(0), mean_xt=X.mean(0))


def _outlier_data(magnitude: float = 30.0, n_outliers: int = 4, m: int = 2048, n0: int = 256, seed: int = 0):
    """Inputs whose ``n_outliers`` channels are ``magnitude`` times larger than the rest (as in
    LLM activations), and two layers reading them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n0, generator=g)
    X[:, torch.randperm(n0, generator=g)[:n_outliers]] *= magnitude
    Ws = [torch.randn(96, n0, generator=g) / n0**0.5, torch.randn(64, n0, generator=g) / n0**0.5]
    return X, Ws


def _rel(loss: float, X: torch.Tensor, Ws) -> float:
    energy = sum(float((X.double() @ W.double().T).pow(2).sum()) for W in Ws)
    return (loss / energy) ** 0.5


@pytest.mark.parametrize("rule", ["minmax", "mse"])
@pytest.mark.parametrize("sym", [True, False])
def test_alpha_zero_is_plain_rtn_and_awq_never_does_worse(rule, sym):
    X, Ws = _outlier_data(magnitude=3.0, seed=1)
    stats = _stats(X)
    q = rtn_fake_quant(3, "group:64", sym, rule)
    res = awq_scales(Ws, stats, q, n_grid=10)
    assert res.alphas[0] == 0 and torch.allclose(res.alphas, torch.arange(10, dtype=torch.float64) / 10)
    # the α = 0 loss is plain RTN's output error, computed independently
    cfg = RTNConfig(bits=3, granularity="group:64", symmetric=sym, scale_rule=rule)
    rtn = sum(float(row_output_error(W, rtn_quantize_weight(W, None, cfg).dequantize(), stats.H, stats.G,
                                     stats.F).sum()) for W in Ws)
    assert res.loss_plain == pytest.approx(rtn, rel=1e-9)
    assert res.loss <= res.loss_plain and res.loss == float(res.losses.min())
    assert torch.equal(scales_for(activation_scale(stats), 0.0), torch.ones(256, dtype=torch.float64))


@pytest.mark.parametrize("bits,group", [(3, 64), (3, 128), (4, 64), (4, 128)])
@pytest.mark.parametrize("sym", [True, False])
def test_outlier_channels_awq_lowers_the_output_error_clearly(bits, group, sym):
    X, Ws = _outlier_data()
    stats = _stats(X)
    res = awq_scales(Ws, stats, rtn_fake_quant(bits, f"group:{group}", sym, "minmax"))
    assert 0 < res.alpha < 1
    assert _rel(res.loss, X, Ws) < 0.6 * _rel(res.loss_plain, X, Ws)  # measured: 0.51-0.52 of RTN's
    # the paper's mean |x| as s_X gives the same kind of gain as the RMS from the statistics
    res_abs = awq_scales(Ws, stats, rtn_fake_quant(bits, f"group:{group}", sym, "minmax"),
                         act_scale=X.double().abs().mean(0))
    assert res_abs.loss < 0.4 * res_abs.loss_plain


def test_awq_with_minmax_beats_rtn_with_mse_clipping_at_3_bits():
    """Weight-MSE clipping is RTN's best data-free rule here; AWQ (min-max, as in the paper) beats it."""
    X, Ws = _outlier_data()
    stats = _stats(X)
    plain_mse = awq_scales(Ws, stats, rtn_fake_quant(3, "group:64", False, "mse"), n_grid=1).loss
    awq = awq_scales(Ws, stats, rtn_fake_quant(3, "group:64", False, "minmax")).loss
    assert _rel(awq, X, Ws) < 0.7 * _rel(plain_mse, X, Ws)  # measured 0.100 vs 0.177


def test_search_is_deterministic_and_scales_are_normalised():
    X, Ws = _outlier_data(seed=2)
    stats = _stats(X)
    q = rtn_fake_quant(4, "group:64", False, "minmax")
    a, b = awq_scales(Ws, stats, q), awq_scales([W.clone() for W in Ws], stats, q)
    assert a.alpha == b.alpha and torch.equal(a.losses, b.losses) and torch.equal(a.scale, b.scale)
    s = a.scale
    assert bool((s > 0).all()) and float(s.max() * s.min()) == pytest.approx(1.0)
    s_x = activation_scale(stats)
    assert torch.allclose(s, s_x.pow(a.alpha) / (s_x.pow(a.alpha).max() * s_x.pow(a.alpha).min()).sqrt())


def test_loss_is_the_error_of_the_scaled_layer_on_the_scaled_input():
    """What the engine does after the search (W·s rounded, the input divided by s) has exactly the
    searched loss: the search scores the model the fold produces."""
    X, Ws = _outlier_data(seed=3)
    res = awq_scales(Ws, _stats(X), rtn_fake_quant(3, "group:64", True, "minmax"))
    s = res.scale
    Xs = X.double() / s  # (m, N0): the input after the predecessor is divided by s
    cfg = RTNConfig(bits=3, granularity="group:64", scale_rule="minmax")
    err = 0.0
    for W in Ws:
        W_hat = rtn_quantize_weight(W.double() * s, None, cfg).dequantize().double()  # (out, N0)
        err += float((X.double() @ W.double().T - Xs @ W_hat.T).pow(2).sum())
    assert err == pytest.approx(res.loss, rel=1e-6)


def test_losses_of_layers_sharing_the_input_add_up():
    X, Ws = _outlier_data(seed=4)
    stats = _stats(X)
    q = rtn_fake_quant(4, "channel", False, "minmax")
    both = awq_scales(Ws, stats, q, n_grid=8).losses
    apart = awq_scales(Ws[:1], stats, q, n_grid=8).losses + awq_scales(Ws[1:], stats, [q], n_grid=8).losses
    assert torch.allclose(both, apart, rtol=1e-12)


def test_dead_inputs_get_finite_scales():
    X, Ws = _outlier_data(seed=5)
    X[:, :8] = 0  # channels that never fire
    res = awq_scales(Ws, _stats(X), rtn_fake_quant(4, "group:64", False, "minmax"))
    assert bool(torch.isfinite(res.scale).all()) and float(res.scale.max() / res.scale.min()) <= 1e4


def test_bad_arguments_are_one_line_errors():
    X, Ws = _outlier_data(seed=6, m=64)
    stats = _stats(X)
    q = rtn_fake_quant(4, "channel", True)
    with pytest.raises(ValueError, match="layer 0 has weight shape"):
        awq_scales([Ws[0][:, :10]], stats, q)
    with pytest.raises(ValueError, match="positive integer"):
        awq_scales(Ws, stats, q, n_grid=0)
    with pytest.raises(ValueError, match="2 quantizers for 1 layers"):
        awq_scales(Ws[:1], stats, [q, q])
    with pytest.raises(ValueError, match="at least one layer"):
        awq_scales([], stats, q)
    with pytest.raises(ValueError, match="finite non-negative"):
        awq_scales(Ws, stats, q, act_scale=-torch.ones(256))
    assert alpha_grid(4).tolist() == [0.0, 0.25, 0.5, 0.75]


def test_configs_awq_on_any_method_and_the_awq_method():
    cfg = make_config("awq+gptq", bits=3, granularity="group:32")
    assert isinstance(cfg, GPTQConfig) and cfg.awq and cfg.awq_grid == 20 and cfg.needs_data
    assert cfg.method == "gptq"
    d = json.loads(json.dumps(cfg.to_dict(), allow_nan=False))
    assert d["awq"] is True and d["awq_grid"] == 20 and d["method"] == "gptq"
    # configs without AWQ say nothing about it: their dicts are what they were before AWQ existed
    assert "awq" not in RTNConfig().to_dict() and "awq_grid" not in GPTQConfig(awq_grid=5).to_dict()
    assert not RTNConfig().needs_data and RTNConfig(awq=True).needs_data
    awq = make_config("awq", bits=4)
    assert isinstance(awq, AWQConfig) and awq.awq and awq.needs_data and awq.scale_rule == "output-mse"
    assert awq.to_dict()["method"] == "awq"
    assert "awq+gpfq" in method_choices() and "awq+awq" not in method_choices() and "awq" in method_choices()
    with pytest.raises(ValueError, match="'awq\\+awq' is not a method"):
        make_config("awq+awq")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_config("awq+nope")
    with pytest.raises(ValueError, match="takes no awq=False"):
        make_config("awq+rtn", awq=False)
    with pytest.raises(ValueError, match="for RTN alone use method 'rtn'"):
        AWQConfig(awq=False)
    with pytest.raises(ValueError, match="config.awq_grid must be a positive integer"):
        RTNConfig(awq=True, awq_grid=0)
    with pytest.raises(ValueError, match="config.awq must be True or False"):
        RTNConfig(awq=1)


def test_search_quantizer_follows_the_config():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    rtn = RTNConfig(bits=3, granularity="group:16", symmetric=False)  # data-free "mse": the same rounding
    want = rtn_quantize_weight(W, None, rtn).dequantize().double()
    assert torch.equal(search_quantizer(rtn, 3, rtn.granularity)(W), want)
    gptq = GPTQConfig(bits=3)  # "output-mse" needs H: the search rounds min-max
    want = rtn_quantize_weight(W, None, RTNConfig(bits=3, scale_rule="minmax")).dequantize().double()
    assert torch.equal(search_quantizer(gptq, 3, gptq.granularity)(W), want)


def test_float_input_shortcut_equals_the_general_loss():
    """One matrix as H, G and F (the engine's float inputs) takes the one-product loss (ŵ−w)ᵀF(ŵ−w);
    the same statistics as three separate tensors take the general form: same α, same losses."""
    X, Ws = _outlier_data(magnitude=3.0, seed=2)
    shared_stats = _stats(X)  # H is G is F
    F, m, mean = shared_stats.F, shared_stats.n_rows, shared_stats.mean_x
    q = rtn_fake_quant(3, "group:64", False, "minmax")
    shared = awq_scales(Ws, shared_stats, q, n_grid=10)
    apart = awq_scales(Ws, LayerStats(H=F.clone(), G=F.clone(), F=F.clone(), n_rows=m, mean_x=mean, mean_xt=mean),
                       q, n_grid=10)
    assert shared.alpha == apart.alpha
    torch.testing.assert_close(shared.losses, apart.losses, rtol=1e-9, atol=0)
