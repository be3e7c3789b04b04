import math

import numpy as np
import pytest
import torch

from specquant.core.frames import analysis, frame_variation, harmonic_frame, synthesis
from specquant.core.sigma_delta import (
    alphabet,
    decode,
    first_order,
    second_order,
    sigma_delta,
    stable_input_bound,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_alphabet_and_codes(bits):
    K = 1 << (bits - 1)
    A = alphabet(bits, 2.0)
    assert A.numel() == 2 * K and torch.allclose(A, 2.0 * (torch.arange(2 * K) - K + 0.5).double())
    x = (torch.rand(50, 7, generator=_gen(), dtype=torch.float64) * 2 - 1) * (K - 0.5) * 2.0
    for order in (1, 2):
        r = sigma_delta(x, 2.0, bits, order)
        assert r.codes.dtype == torch.uint8 and r.codes.shape == (50, 7)
        assert int(r.codes.max()) <= 2 * K - 1
        vals = decode(r.codes, 2.0, bits)
        assert torch.isin(vals, A).all(), "every output is an alphabet point"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_first_order_state_bound(bits):
    """|u_n| ≤ δ/2 whenever |x_n| ≤ (K − ½)·δ, on random inputs including the extremes."""
    K = 1 << (bits - 1)
    delta = torch.tensor([0.3, 1.0, 2.5, 7.0], dtype=torch.float64).repeat(25)  # one δ per column
    g = _gen(bits)
    x = (torch.rand(400, 100, generator=g, dtype=torch.float64) * 2 - 1) * (K - 0.5) * delta
    x[::7] = torch.sign(x[::7]) * (K - 0.5) * delta  # inputs at the bound
    r = sigma_delta(x, delta, bits, order=1, return_states=True)
    assert (r.states[0].abs() <= delta / 2 + 1e-12).all()
    assert torch.allclose(r.max_state[0], r.states[0].abs().amax(0))
    # the recursion: u_n = u_{n−1} + x_n − q_n
    q = decode(r.codes, delta, bits)
    u = torch.cumsum(x - q, dim=0)
    assert torch.allclose(u, r.states[0], atol=1e-9)
    codes, u_last = first_order(x, delta, bits)
    assert torch.equal(codes, r.codes) and torch.allclose(u_last, u[-1])


def test_first_order_is_greedy_nearest_point():
    x = torch.tensor([0.3, -0.2, 0.45, 0.1], dtype=torch.float64)
    r = sigma_delta(x, 1.0, 1, order=1, return_states=True)
    # w = u + x; q = nearest of ±½
    u, qs = 0.0, []
    for xn in x.tolist():
        w = u + xn
        q = 0.5 if w >= 0 else -0.5
        qs.append(q)
        u = w - q
    assert decode(r.codes, 1.0, 1).tolist() == qs


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_second_order_state_bounded(bits):
    """States stay bounded for inputs within stable_input_bound (proved for b ≥ 2, checked for b = 1)."""
    rho = stable_input_bound(bits, 2)
    g = _gen(10 + bits)
    N, M = 3000, 60
    t = torch.arange(N, dtype=torch.float64)[:, None]
    x = torch.cat([
        (torch.rand(N, M, generator=g, dtype=torch.float64) * 2 - 1) * rho,
        torch.sign(torch.randn(N, M, generator=g, dtype=torch.float64)) * rho,
        rho * torch.sign(torch.sin(t * torch.rand(M, generator=g, dtype=torch.float64) * 0.3)),
        rho * torch.sin(t * torch.rand(M, generator=g, dtype=torch.float64) * 0.1 + 1.0),
    ], dim=1)
    r = sigma_delta(x, 1.0, bits, order=2)
    max_u, max_v = r.max_state.amax(dim=1).tolist()
    if bits >= 2:
        assert max_v <= 0.5 + 1e-12 and max_u <= 1.0 + 1e-12  # greedy: |v| ≤ δ/2, |u| ≤ δ
    else:
        assert max_u < 1.0 and max_v <= 1.5
    # the recursion: second difference of v is x − q
    _, final = second_order(x, 1.0, bits)
    q = decode(r.codes, 1.0, bits)
    v = torch.cumsum(torch.cumsum(x - q, 0), 0)
    assert torch.allclose(final[1], v[-1], atol=1e-8) and torch.allclose(final, r.final_state)


def test_second_order_one_bit_grows_past_the_bound():
    """The 1-bit rule is only stable for small inputs: at 0.45·δ the states blow up."""
    t = torch.arange(5000, dtype=torch.float64)[:, None]
    x = 0.45 * torch.sign(torch.sin(t * torch.linspace(0.001, 0.3, 40, dtype=torch.float64)))
    assert sigma_delta(x, 1.0, 1, order=2).max_state[1].max() > 5


def _frame_errors(d, Ns, order, bits, M=60):
    V = torch.randn(d, M, generator=_gen(1), dtype=torch.float64)
    errs = []
    for N in Ns:
        F = harmonic_frame(d, N)
        X = analysis(F, V)
        delta = X.abs().amax(0) / stable_input_bound(bits, order)
        r = sigma_delta(X, delta, bits, order)
        V_hat = synthesis(F, decode(r.codes, delta, bits))
        errs.append(float(((V_hat - V).norm(dim=0) / V.norm(dim=0)).mean()))
    slope = float(np.polyfit(np.log(Ns), np.log(errs), 1)[0])
    return slope, errs


def test_first_order_error_decays_like_one_over_N():
    """Odd d (frame not zero-sum): the boundary term u_{N−1}·e_{N−1} gives error ≈ C/N."""
    slope, errs = _frame_errors(3, [48, 96, 192, 384, 768], order=1, bits=1)
    assert -1.25 < slope < -0.85, (slope, errs)


@pytest.mark.parametrize("d,N", [(3, 30), (4, 64), (16, 40)])
def test_first_order_error_bound(d, N):
    """‖v − ṽ‖ ≤ (d/N)·(δ/2)·(σ(F) + 1): summation by parts with |u_n| ≤ δ/2 (BPY 2006)."""
    F = harmonic_frame(d, N)
    V = torch.randn(d, 50, generator=_gen(2), dtype=torch.float64)
    X = analysis(F, V)
    delta = X.abs().amax(0) / stable_input_bound(2, 1)
    r = sigma_delta(X, delta, 2, order=1)
    err = (synthesis(F, decode(r.codes, delta, 2)) - V).norm(dim=0)
    assert (err <= (d / N) * (delta / 2) * (frame_variation(F) + 1) + 1e-12).all()


def test_second_order_faster_on_zero_sum_frames():
    """Even d and even N: u_{N−1} = 0, error O(1/N²) for second order (first order also beats 1/N)."""
    Ns = [64, 128, 256, 512, 1024]
    s1, e1 = _frame_errors(4, Ns, order=1, bits=1)
    s2, e2 = _frame_errors(4, Ns, order=2, bits=1)
    assert s2 < -1.8, (s2, e2)
    assert s2 < s1 - 0.4
    assert e2[-1] < e1[-1] / 3
    s2b, _ = _frame_errors(4, Ns, order=2, bits=2)
    assert s2b < -1.8


def test_second_order_no_faster_on_odd_d():
    """Odd d: the constant coordinate makes Σx_n ≠ 0, the boundary term stays, slope ≈ −1."""
    s2, e2 = _frame_errors(3, [48, 96, 192, 384, 768], order=2, bits=2)
    assert -1.3 < s2 < -0.8, (s2, e2)


def test_bad_input():
    x = torch.zeros(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="order"):
        sigma_delta(x, 1.0, 1, order=3)
    with pytest.raises(ValueError, match="bits"):
        sigma_delta(x, 1.0, 0)
    with pytest.raises(ValueError, match="delta"):
        sigma_delta(x, -1.0, 1)
    with pytest.raises(ValueError, match="all zero"):
        sigma_delta(torch.ones(3, 1, dtype=torch.float64), 0.0, 1)
    r = sigma_delta(x, 0.0, 2)  # zero column, zero step: decodes to zeros
    assert decode(r.codes, 0.0, 2).abs().max() == 0
    assert math.isclose(stable_input_bound(3, 1), 3.5) and math.isclose(stable_input_bound(3, 2), 2.5)
