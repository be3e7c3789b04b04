"""Qronos against theory: the paper's two least-squares steps, GPTQ when X̃ = X, the
least-squares floor at high bits, and orderings against GPTQ and RTN when earlier layers
carry error in (X̃ ≠ X)."""
import copy
import json

import pytest
import torch
from torch import nn

import specquant as sq
from specquant.algorithms import GPTQConfig, QronosConfig, RTNConfig, gptq, qronos, rtn
from specquant.algorithms.common import to_quantized_weight
from specquant.cli import main


def out_err(W, W_hat, X, Xt):
    """‖X Wᵀ − X̃ Ŵᵀ‖_F / ‖X Wᵀ‖_F on explicit data."""
    ref = X.double() @ W.double().T  # (m, out)
    return float((ref - Xt.double() @ W_hat.double().T).norm() / ref.norm())


def layer(seed, noise, m=600, n0=48, out=24):
    """Correlated ReLU inputs X (m, n0), X̃ = X + noise (the error carried in), W (out, n0)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n0, n0, generator=g) / n0**0.5
    X = torch.relu(torch.randn(m, n0, generator=g) @ A + 0.1)
    Xt = X + noise * torch.randn(m, n0, generator=g)
    W = torch.randn(out, n0, generator=g) / n0**0.5
    return W, X, Xt


@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group:8", False), ("tensor", True)])
@pytest.mark.parametrize("act_order", [True, False])
def test_with_matching_inputs_qronos_is_gptq(layer_data, stats_from, granularity, symmetric, act_order):
    """X̃ = X (G = H): the correction gives p_1 = w_1 and the least-squares step is GPTQ's update
    for column 1, so with the same damping (the defaults of both) the codes are GPTQ's."""
    W, X, _ = layer_data
    s = stats_from(X, X)
    kw = dict(bits=3, granularity=granularity, symmetric=symmetric, act_order=act_order, block_size=16)
    a = gptq.quantize_weight(W, s, GPTQConfig(**kw, search=()))  # Qronos has no step search
    b = qronos.quantize_weight(W, s, QronosConfig(**kw))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert b.algorithm == "qronos" and b.info["damp_rule"] == "mean-diag"


def test_covariance_form_is_the_papers_two_steps_on_explicit_data(layer_data):
    """Without damping, the GPTQ-form implementation equals the paper's iteration written out on
    X and X̃: round the least-squares value of column t with the later columns at their current
    values, then re-solve the least-squares problem for all later columns."""
    W, X, Xt = layer_data
    s = sq.algorithms.LayerStats(H=Xt.double().T @ Xt.double(), G=Xt.double().T @ X.double(), F=None,
                                 n_rows=X.shape[0], mean_x=X.mean(0).double(), mean_xt=Xt.mean(0).double())
    cfg = QronosConfig(bits=3, damp=0.0, act_order=False, block_size=5)
    qw = qronos.quantize_weight(W, s, cfg)
    scale = qw.scale.double().reshape(-1, 1)  # (out, 1)
    zp = qw.zero_point.double().reshape(-1, 1)
    Xd, Xtd = X.double(), Xt.double()
    target = Xd @ W.double().T  # (m, out)
    V = W.double().clone()  # (out, N0) current values of the columns not yet rounded
    Q = torch.zeros_like(V)
    n = W.shape[1]
    for t in range(n):
        r = target - Xtd[:, :t] @ Q[:, :t].T - Xtd[:, t + 1:] @ V[:, t + 1:].T  # (m, out)
        p = (Xtd[:, t] @ r) / (Xtd[:, t] @ Xtd[:, t])  # (out,) correct the past
        c = torch.round(p / scale[:, 0] + zp[:, 0]).clamp(qw.spec.qmin, qw.spec.qmax)
        Q[:, t] = (c - zp[:, 0]) * scale[:, 0]
        if t + 1 < n:  # shape the future
            r = target - Xtd[:, :t + 1] @ Q[:, :t + 1].T
            V[:, t + 1:] = torch.linalg.lstsq(Xtd[:, t + 1:], r).solution.T
    assert torch.allclose(qw.dequantize().double(), Q, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
def test_with_carried_in_error_qronos_beats_gptq_and_rtn(stats_from, bits):
    """X̃ = X + noise: Qronos targets X w, GPTQ X̃ w; on the float target Qronos is the better
    of the two on every seed (same grids: both take their scales from W and H), and better
    than round-to-nearest."""
    for seed in range(6):
        W, X, Xt = layer(seed, noise=0.2)
        s = stats_from(X, Xt)
        e_q = out_err(W, qronos.quantize_weight(W, s, QronosConfig(bits=bits)).dequantize(), X, Xt)
        e_g = out_err(W, gptq.quantize_weight(W, s, GPTQConfig(bits=bits)).dequantize(), X, Xt)
        e_r = out_err(W, rtn.quantize_weight(W, s, RTNConfig(bits=bits)).dequantize(), X, Xt)
        assert e_q < e_g < e_r, (seed, e_q, e_g, e_r)


def test_two_bits_beat_rtn(stats_from):
    for seed in range(6):
        W, X, Xt = layer(seed, noise=0.2)
        s = stats_from(X, Xt)
        e_q = out_err(W, qronos.quantize_weight(W, s, QronosConfig(bits=2)).dequantize(), X, Xt)
        e_r = out_err(W, rtn.quantize_weight(W, s, RTNConfig(bits=2)).dequantize(), X, Xt)
        assert e_q < e_r


def test_eight_bits_reach_the_least_squares_floor_and_codes_round_trip(layer_data, stats_from):
    """At 8 bits the rounding error is small, so Qronos's error comes down to the floor
    min_u ‖X w − X̃ u‖ (the part of X w outside the span of X̃), which GPTQ does not reach;
    with X̃ = X the error itself is tiny."""
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    qw = qronos.quantize_weight(W, s, QronosConfig(bits=8))
    W_ls = torch.linalg.solve(s.H, s.G @ W.double().T).T  # (out, N0) least-squares weights
    floor = out_err(W, W_ls, X, Xt)
    e_q = out_err(W, qw.dequantize(), X, Xt)
    e_g = out_err(W, gptq.quantize_weight(W, s, GPTQConfig(bits=8)).dequantize(), X, Xt)
    assert floor <= e_q <= 1.01 * floor < e_g
    same = qronos.quantize_weight(W, stats_from(X, X), QronosConfig(bits=8))
    assert out_err(W, same.dequantize(), X, X) < 0.01
    for q in (qw, same):
        assert int(q.codes.min()) >= q.spec.qmin and int(q.codes.max()) <= q.spec.qmax
        again = to_quantized_weight(q.dequantize(), q.scale, q.zero_point, q.spec, q.granularity, "qronos", {})
        assert torch.equal(again.codes, q.codes)


def test_groups_and_asymmetric_grids(stats_from):
    W, X, Xt = layer(3, noise=0.2)
    s = stats_from(X, Xt)
    for gran in ("group:8", "group:16"):
        cfg = QronosConfig(bits=3, granularity=gran, symmetric=False)
        qw = qronos.quantize_weight(W, s, cfg)
        G = int(gran.split(":")[1])
        assert qw.scale.shape == (W.shape[0], W.shape[1] // G, 1) == qw.zero_point.shape
        assert qw.spec.kind == "asymmetric" and int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 7
        again = to_quantized_weight(qw.dequantize(), qw.scale, qw.zero_point, qw.spec, qw.granularity, "q", {})
        assert torch.equal(again.codes, qw.codes)
        e_q = out_err(W, qw.dequantize(), X, Xt)
        e_r = out_err(W, rtn.quantize_weight(W, s, RTNConfig(bits=3, granularity=gran, symmetric=False))
                      .dequantize(), X, Xt)
        e_g = out_err(W, gptq.quantize_weight(W, s, GPTQConfig(bits=3, granularity=gran, symmetric=False))
                      .dequantize(), X, Xt)
        assert e_q < e_g < e_r


def test_block_size_and_damping_rule_details(layer_data, stats_from):
    """The lazy blocks change the speed only; the 'max-eig' rule uses λ_max(H)."""
    W, X, Xt = layer_data
    s = stats_from(X, Xt)
    codes = [qronos.quantize_weight(W, s, QronosConfig(bits=3, block_size=b)).codes for b in (1, 7, 128)]
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])
    lam = qronos.largest_eigenvalue(s.H)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(s.H)[-1]), rel=1e-6)
    qw = qronos.quantize_weight(W, s, QronosConfig(bits=3, damp=1e-6, damp_rule="max-eig"))
    assert qw.info["damp_rule"] == "max-eig"
    assert out_err(W, qw.dequantize(), X, Xt) < out_err(
        W, rtn.quantize_weight(W, s, RTNConfig(bits=3)).dequantize(), X, Xt)


def test_dead_inputs_get_zero_weights_and_their_float_part_is_absorbed(stats_from):
    """An input that is 0 on every row of X̃ but not of X: its weight is 0, and the other
    columns take over what they can of X_t w_t (GPTQ ignores that part)."""
    W, X, Xt = layer(1, noise=0.05)
    for dead, act_order in ((5, True), (5, False), (0, False)):  # (0, False): the first column processed
        Xd = Xt.clone()
        Xd[:, dead] = 0
        s = stats_from(X, Xd)
        W_hat = qronos.quantize_weight(W, s, QronosConfig(bits=4, act_order=act_order)).dequantize()
        assert torch.isfinite(W_hat).all() and bool((W_hat[:, dead] == 0).all())
        e_g = out_err(W, gptq.quantize_weight(W, s, GPTQConfig(bits=4, act_order=act_order)).dequantize(), X, Xd)
        assert out_err(W, W_hat, X, Xd) < e_g


def test_one_input_column(stats_from):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 1, generator=g)
    W = torch.randn(4, 1, generator=g)
    qw = qronos.quantize_weight(W, stats_from(X, X + 0.1), QronosConfig(bits=4))
    assert qw.codes.shape == (4, 1) and torch.isfinite(qw.dequantize()).all()


def test_bad_settings_are_one_line_errors():
    for kw, msg in ((dict(damp=-1.0), "damp must be a finite number >= 0"),
                    (dict(damp=float("nan")), "damp must be a finite number >= 0"),
                    (dict(damp_rule="max"), "unknown damp_rule 'max'; allowed: max-eig, mean-diag"),
                    (dict(block_size=0), "block_size must be an integer >= 1"),
                    (dict(refine_sweeps=-1), "refine_sweeps must be an integer >= 0"),
                    (dict(scale_rule="best"), "unknown scale rule 'best'")):
        with pytest.raises(ValueError, match=msg) as e:
            QronosConfig(**kw)
        assert "\n" not in str(e.value)
    ones = torch.ones(4, 4, dtype=torch.float64)  # rank 1: singular without damping
    singular = sq.algorithms.LayerStats(H=ones, G=ones, F=None, n_rows=1, mean_x=torch.ones(4), mean_xt=torch.ones(4))
    with pytest.raises(ValueError, match="Qronos: the damped Hessian of layer 'fc' is not positive definite"):
        qronos.quantize_weight(torch.randn(3, 4), singular, QronosConfig(damp=0.0), sq.algorithms.QuantContext("fc", 0))


def test_refinement_only_lowers_the_error(stats_from):
    W, X, Xt = layer(2, noise=0.2)
    s = stats_from(X, Xt)
    plain = out_err(W, qronos.quantize_weight(W, s, QronosConfig(bits=3)).dequantize(), X, Xt)
    refined = out_err(W, qronos.quantize_weight(W, s, QronosConfig(bits=3, refine_sweeps=2)).dequantize(), X, Xt)
    assert refined <= plain


def test_through_quantize_on_an_mlp():
    """The engine hands Qronos X̃ from the partly quantized model: the model's error is below
    round-to-nearest's, and each layer keeps a Qronos QuantizedWeight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    x = torch.randn(512, 16) @ torch.randn(16, 16) / 4
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for cfg in (sq.RTNConfig(bits=3), sq.QronosConfig(bits=3), sq.QronosConfig(bits=3, granularity="group:8")):
        m = copy.deepcopy(model)
        report = sq.quantize(m, cfg, calib=x, progress=False)
        with torch.no_grad():
            errs[(cfg.method, cfg.granularity.label())] = float((m(x) - ref).norm() / ref.norm())
        if cfg.method == "qronos":
            assert [r.name for r in report.layers] == ["0", "2", "4"]
            assert all(mod.qweight.algorithm == "qronos" for mod in m if isinstance(mod, nn.Linear))
    assert errs[("qronos", "channel")] < errs[("rtn", "channel")]
    assert errs[("qronos", "group:8")] < errs[("rtn", "channel")]


def test_cli_method_qronos(capsys):
    assert main(["quantize", "digits-mlp", "--method", "qronos", "--bits", "3", "--calib", "128",
                 "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["method"] == "qronos" and m["bits"] == 3
    assert m["accuracy"] >= m["float_accuracy"] - 3.0
    assert [r["name"] for r in m["layers"]] == ["fc1", "fc2", "fc3"]


def test_uneven_groups_and_float16_scales_through_the_engine():
    """576 inputs at group:128 (last group of 64) with float16 scales: the stored scales are exact
    float16, and Qronos stays below RTN on the same data."""
    import copy

    import specquant as sq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(576, 48), torch.nn.GELU(), torch.nn.Linear(48, 24))
    x = torch.randn(192, 576)
    errs = {}
    for name in ("qronos", "rtn"):
        m = copy.deepcopy(model)
        cfg = sq.algorithms.make_config(name, bits=3, granularity="group:128", symmetric=False,
                                        scale_dtype="float16")
        report = sq.quantize(m, cfg, calib=x, progress=False)
        qw = m[0].qweight
        assert qw.scale_dtype == torch.float16 and qw.scale.shape[1] == 5  # 4 groups of 128, one of 64
        assert torch.equal(qw.scale.half().float(), qw.scale.float())  # exact in float16
        errs[name] = report.layers[-1].rel_output_error
    assert errs["qronos"] < errs["rtn"]
