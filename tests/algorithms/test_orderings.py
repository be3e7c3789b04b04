"""Orderings the theory predicts, on one layer with explicit data."""
import pytest
import torch

from specquant.algorithms import GPFQConfig, GPTQConfig, QuantContext, RTNConfig, SPFQConfig, gpfq, gptq, rtn, spfq
from specquant.algorithms.common import relative_output_error, row_output_error


def out_err(W, W_hat, X, Xt):
    return float((X.double() @ W.double().T - Xt.double() @ W_hat.double().T).norm())


def test_covariance_error_matches_explicit(layer_data, stats_from):
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    W_hat = W + 0.01 * torch.randn_like(W)
    direct = (X.double() @ W.double().T - Xt.double() @ W_hat.double().T).pow(2).sum(0)
    assert torch.allclose(row_output_error(W, W_hat, s.H, s.G, s.F), direct, rtol=1e-8, atol=1e-10)
    ref = (X.double() @ W.double().T).norm()
    assert relative_output_error(W, W_hat, s.H, s.G, s.F) == pytest.approx(float(direct.sum().sqrt() / ref))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rule", ["mse", "authors"])
@pytest.mark.parametrize("perturbed", [False, True])
def test_gpfq_and_gptq_beat_rtn(layer_data, bits, rule, perturbed, stats_from):
    """Same grid (a step rule that does not look at RTN's output error), same data.

    The "output-mse" rule is left out on purpose: it picks the step that is optimal for RTN
    itself, and measured here greedy GPFQ on that step is sometimes slightly worse (3 bits:
    14.9 vs 14.7), so that comparison is not an ordering the theory gives.
    """
    W, X, Xt = layer_data
    if not perturbed:
        Xt = X
    s = stats_from(X, Xt)
    e_rtn = out_err(W, rtn.quantize_weight(W, s, RTNConfig(bits=bits, scale_rule=rule)).dequantize(), X, Xt)
    e_gpfq = out_err(W, gpfq.quantize_weight(W, s, GPFQConfig(bits=bits, scale_rule=rule)).dequantize(), X, Xt)
    e_gptq = out_err(W, gptq.quantize_weight(W, s, GPTQConfig(bits=bits, scale_rule=rule)).dequantize(), X, Xt)
    assert e_gpfq <= e_rtn
    # GPTQ targets X̃W (not XW); with X̃ ≠ X compare on its own objective as well.
    t_rtn = out_err(W, rtn.quantize_weight(W, s, RTNConfig(bits=bits, scale_rule=rule)).dequantize(), Xt, Xt)
    t_gptq = out_err(W, gptq.quantize_weight(W, s, GPTQConfig(bits=bits, scale_rule=rule)).dequantize(), Xt, Xt)
    assert t_gptq <= t_rtn
    assert e_gptq < 2 * e_rtn


def test_gpfq_matches_plain_loop(layer_data, stats_from):
    """The covariance form with lazy blocks equals the textbook loop on explicit X, X̃."""
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    cfg = GPFQConfig(bits=3, act_order=False, block_size=7, refine_sweeps=0)  # the path alone
    qw = gpfq.quantize_weight(W, s, cfg)
    scale = qw.scale.double().reshape(-1)  # (out,)
    zp = qw.zero_point.double().reshape(-1)
    Xd, Xtd, Wd = X.double(), Xt.double(), W.double()
    u = torch.zeros(X.shape[0], W.shape[0], dtype=torch.float64)  # (m, out)
    Q = torch.zeros_like(Wd)
    for t in range(W.shape[1]):
        z = (Xtd[:, t] @ (u + Xd[:, t:t + 1] * Wd[:, t])) / (Xtd[:, t] @ Xtd[:, t])  # (out,)
        c = torch.round(z / scale + zp).clamp(qw.spec.qmin, qw.spec.qmax)
        q = (c - zp) * scale
        Q[:, t] = q
        u = u + Xd[:, t:t + 1] * Wd[:, t] - Xtd[:, t:t + 1] * q
    assert torch.allclose(qw.dequantize().double(), Q, atol=1e-6)


def test_gptq_matches_rtn_when_hessian_is_diagonal(stats_from):
    """With orthogonal inputs (diagonal H) there is no error to feed back: GPTQ = RTN."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g)
    X = torch.eye(16) * torch.rand(16, generator=g).add(0.5)
    s = stats_from(X, X)
    a = gptq.quantize_weight(W, s, GPTQConfig(bits=3, scale_rule="mse", damp=0.0, search=())).codes
    b = rtn.quantize_weight(W, s, RTNConfig(bits=3, scale_rule="mse")).codes
    assert torch.equal(a, b)


def test_spfq_is_unbiased(layer_data, stats_from):
    """E[Ŵ] over seeds is close to the path's continuous value: mean error shrinks like 1/√seeds."""
    W, X, Xt = layer_data
    s = stats_from(X, X)
    cfg = SPFQConfig(bits=4, scale_rule="mse", act_order=False)
    outs = torch.stack([spfq.quantize_weight(W, s, cfg, QuantContext("fc", seed=k)).dequantize() for k in range(64)])
    step = float(spfq.quantize_weight(W, s, cfg, QuantContext("fc", seed=0)).scale.max())
    mean_out = (X @ outs.mean(0).T)
    ref = X @ W.T
    single = (X @ outs[0].T - ref).norm()
    averaged = (mean_out - ref).norm()
    assert averaged < 0.35 * single  # 1/√64 = 0.125 for independent errors; allow correlation
    assert step > 0


def test_alignment_error_decreases_with_order(layer_data, stats_from):
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    order = torch.arange(W.shape[1])
    errs = [float(spfq.alignment_error(W, spfq.align(W, s, r, order), s).sum()) for r in (1, 2, 3, 5)]
    assert errs[1] < errs[0]
    assert errs[2] <= errs[1] * (1 + 1e-9)
    assert errs[3] <= errs[2] * (1 + 1e-9)


def test_perfect_alignment_feasible_and_infeasible(stats_from):
    g = torch.Generator().manual_seed(2)
    n0, m = 20, 12  # fewer rows than inputs: X̃w̃ = Xw is solvable
    X = torch.randn(m, n0, generator=g)
    Xt = X + 0.1 * torch.randn(m, n0, generator=g)
    W = torch.randn(5, n0, generator=g)
    s = stats_from(X, Xt)
    Wt = spfq.perfect_alignment(W, s, "fc")
    assert torch.allclose(Xt.double() @ Wt.T, X.double() @ W.double().T, atol=1e-6)
    # Minimal ∞-norm: no smaller than the least-squares solution's ∞-norm.
    W_ls = torch.linalg.lstsq(Xt.double(), (X.double() @ W.double().T)).solution.T
    assert (Wt.abs().amax(1) <= W_ls.abs().amax(1) + 1e-6).all()
    X2 = torch.randn(100, n0, generator=g)
    s2 = stats_from(X2, X2 + 0.1 * torch.randn(100, n0, generator=g))
    with pytest.raises(ValueError, match="infeasible for layer 'fc2'"):
        spfq.perfect_alignment(W, s2, "fc2")


def test_dead_inputs_are_handled(layer_data, stats_from):
    """An input that never fires (X̃_t = 0, so H_tt = 0): GPTQ sets its weights to 0 and gives it no
    error feedback; GPFQ takes w_t itself as the target (any value gives the same output) and
    rounds it; SPFQ rounds it stochastically."""
    W, X, Xt = layer_data
    X = X.clone()
    Xt = Xt.clone()
    X[:, 3] = 0
    Xt[:, 3] = 0
    s = stats_from(X, Xt)
    assert s.H[3, 3] == 0
    cfg = GPTQConfig(bits=3)
    qw = gptq.quantize_weight(W, s, cfg)
    W_hat = qw.dequantize()
    assert torch.equal(W_hat[:, 3], torch.zeros(W.shape[0]))  # set to 0, exactly (0 is on the narrow grid)
    assert torch.equal(qw.codes[:, 3], qw.zero_point.reshape(-1).to(torch.uint8))
    # no error feedback through the dead input: what its weights were changes nothing else
    # (negated, so that every row's max |w|, and with it the scale search, is the same)
    W2 = W.clone()
    W2[:, 3] = -W[:, 3]
    other = gptq.quantize_weight(W2, s, cfg)
    assert torch.equal(other.codes, qw.codes) and torch.equal(other.scale, qw.scale)

    qw = gpfq.quantize_weight(W, s, GPFQConfig(bits=3))
    scale, zp = qw.scale.double().reshape(-1), qw.zero_point.double().reshape(-1)
    c = torch.round(W[:, 3].double() / scale + zp).clamp(qw.spec.qmin, qw.spec.qmax)
    assert torch.equal(qw.codes[:, 3], c.to(torch.uint8))  # nearest grid point to w_t, refinement leaves it

    qw = spfq.quantize_weight(W, s, SPFQConfig(bits=3))
    c = W[:, 3].double() / qw.scale.double().reshape(-1) + qw.zero_point.double().reshape(-1)
    c = c.clamp(qw.spec.qmin, qw.spec.qmax)
    assert ((qw.codes[:, 3].double() - c).abs() < 1).all()  # one of the two grid points around w_t
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("grid", ["fp8-e4m3", "fp8-e5m2"])
def test_error_feedback_on_fp8_beats_rtn_fp8(layer_data, stats_from, grid):
    """GPFQ, GPTQ and Qronos round column by column on the FP8 grid: their output error is at most
    RTN-FP8's on the same scales and data (SPFQ with nearest rounding too)."""
    from specquant.algorithms import QronosConfig, qronos

    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    kw = {"bits": 8, "grid": grid, "scale_rule": "minmax"}
    q_rtn = rtn.quantize_weight(W, s, RTNConfig(**kw))
    e_rtn = out_err(W, q_rtn.dequantize(), X, Xt)
    for qw in (gpfq.quantize_weight(W, s, GPFQConfig(search=(), **kw)),
               qronos.quantize_weight(W, s, QronosConfig(**kw)),
               spfq.quantize_weight(W, s, SPFQConfig(rounding="nearest", **kw))):
        assert qw.spec.kind == grid and torch.equal(qw.scale, q_rtn.scale)
        assert out_err(W, qw.dequantize(), X, Xt) <= e_rtn
        assert bool(torch.isfinite(qw.codes.view(qw.spec.fp8.dtype).float()).all())  # FP8 bit patterns
    t_rtn = out_err(W, q_rtn.dequantize(), Xt, Xt)
    assert out_err(W, gptq.quantize_weight(W, s, GPTQConfig(search=(), **kw)).dequantize(), Xt, Xt) <= t_rtn
    with pytest.raises(ValueError, match=f"config.grid {grid} stores 8-bit codes; it needs bits=8, got bits=4"):
        RTNConfig(bits=4, grid=grid)
