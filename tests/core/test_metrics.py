"""Metrics against closed forms: SQNR, kurtosis, outlier share, KL, rate-distortion gap."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core import metrics
from specquant.core.clipping import calibrate
from specquant.core.grid import GridSpec, fake_quantize

# Best fixed-rate uniform quantizer of a unit Gaussian at 4 bits (2^4 levels, mid-rise, issue 2)
BEST_MIDRISE_4BIT_MSE = 0.011543
# High-rate loss of uniform scalar quantization against D(R), even with ideal entropy coding:
# D ≈ Δ²/12 at entropy H ≈ h(X) − log2 Δ gives D/D(H) = 2πe/12 = πe/6 (1.53 dB).
SCALAR_GAP_DB = 10 * math.log10(math.pi * math.e / 6)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- mse / sqnr

def test_mse_and_sqnr_known_values():
    x = torch.ones(1000)
    assert metrics.mse(x, x + 0.1) == pytest.approx(0.01)
    assert metrics.sqnr(x, x + 0.1) == pytest.approx(20.0)  # 10·log10(1 / 0.01)
    x = torch.tensor([3.0, 4.0])  # ‖x‖² = 25
    assert metrics.sqnr(x, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert metrics.sqnr(x, x.clone()) == math.inf
    assert metrics.sqnr(torch.zeros(3), torch.zeros(3)) == math.inf
    assert metrics.sqnr(torch.zeros(3), torch.ones(3)) == -math.inf
    assert metrics.sqnr(x, torch.zeros(2)) == pytest.approx(0.0)  # error as large as the signal
    assert isinstance(metrics.sqnr(x, x + 1), float) and isinstance(metrics.mse(x, x), float)


def test_metrics_accept_arrays_and_other_dtypes():
    x = np.array([1.0, -2.0, 0.5])
    assert metrics.mse(x, x * 0) == pytest.approx((1 + 4 + 0.25) / 3)
    xb = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    assert metrics.sqnr(xb, xb) == math.inf


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sqnr(torch.ones(3), torch.ones(3, 1))


def test_effective_bits_is_sqnr_over_6_02():
    assert metrics.effective_bits(60.2) == pytest.approx(10.0)
    assert metrics.effective_bits(0.0) == 0.0
    # uniform data on a b-bit grid that tiles its range: SQNR = 6.02·b dB ⇒ b effective bits
    x = torch.rand(100_000, generator=gen(0), dtype=torch.float64) * 2 - 1
    spec = GridSpec(6, "midrise")
    scale, zp = spec.qparams_from_alpha(torch.tensor(1 - 2.0**-6, dtype=torch.float64))
    s = metrics.sqnr(x, fake_quantize(x, scale, zp, spec))
    assert metrics.effective_bits(s) == pytest.approx(6, abs=0.02)


# --------------------------------------------------------------------------- distribution shape

def test_excess_kurtosis_of_known_distributions():
    n = 1_000_000
    assert metrics.excess_kurtosis(torch.randn(n, generator=gen(1))) == pytest.approx(0.0, abs=0.03)
    u = torch.rand(n, generator=gen(2), dtype=torch.float64) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())  # inverse CDF of a unit Laplace
    assert metrics.excess_kurtosis(laplace) == pytest.approx(3.0, abs=0.25)
    assert metrics.excess_kurtosis(torch.rand(n, generator=gen(3))) == pytest.approx(-1.2, abs=0.01)
    assert metrics.excess_kurtosis(torch.full((10,), 4.0)) == 0.0  # constant: no NaN
    assert metrics.excess_kurtosis(torch.tensor([-1.0, 1.0])) == pytest.approx(-2.0)  # two-point law


def test_outlier_share_of_gaussian_is_two_tail_mass():
    x = torch.randn(1_000_000, generator=gen(4))
    expected = math.erfc(3 / math.sqrt(2))  # P(|X| > 3σ) = 0.0027
    assert metrics.outlier_share(x) == pytest.approx(expected, abs=3e-4)
    expected_2 = math.erfc(2 / math.sqrt(2))
    assert metrics.outlier_share(x, k=2.0) == pytest.approx(expected_2, abs=1e-3)
    assert metrics.outlier_share(torch.full((5,), 2.0)) == 0.0
    spiky = torch.zeros(1000)
    spiky[7] = 100.0
    assert metrics.outlier_share(spiky) == pytest.approx(1 / 1000)


# --------------------------------------------------------------------------- KL

def test_kl_divergence_known_values():
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence([1, 1], [1, 3]) == pytest.approx(expected, abs=1e-8)
    assert metrics.kl_divergence([2, 5, 3], [20, 50, 30]) == pytest.approx(0.0, abs=1e-12)  # scale-free
    p = torch.tensor([1.0, 0.0])
    assert metrics.kl_divergence(p, torch.tensor([0.0, 1.0])) > 15  # Q misses P's mass: eps-limited, finite
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.kl_divergence([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.kl_divergence([1, -2], [1, 2])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e3), st.floats(0, 1e3)), min_size=1, max_size=40))
def test_kl_divergence_is_nonnegative_and_zero_on_itself(pairs):
    p = [a for a, _ in pairs]
    q = [b for _, b in pairs]
    assert metrics.kl_divergence(p, q) >= -1e-12
    assert metrics.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- rate-distortion gap

def test_rd_gap_formula():
    x = torch.randn(200_000, generator=gen(5), dtype=torch.float64) * 3.0
    var = float(x.var(correction=0))
    noise = torch.randn(200_000, generator=gen(6), dtype=torch.float64)
    for rate in (1, 2.5, 4):
        d = var * 2.0 ** (-2 * rate)  # D(R): a reconstruction exactly at the bound has gap 0 dB
        x_hat = x + noise / float(noise.std(correction=0)) * math.sqrt(d) * math.sqrt(2)  # twice D
        assert metrics.rd_gap_db(x, x_hat, rate) == pytest.approx(10 * math.log10(2), abs=0.05)
    assert metrics.rd_gap_db(x, x, 3) == -math.inf
    with pytest.raises(ValueError, match="zero variance"):
        metrics.rd_gap_db(torch.ones(4), torch.zeros(4), 2)


def test_rd_gap_of_uniform_scalar_quantizer_on_gaussian():
    """A b-bit uniform quantizer (MSE-optimal clipping) stays above D(R) = σ²2^(−2b) by at least the
    scalar-quantization loss πe/6 (1.53 dB), and its fixed-rate gap widens with the rate."""
    x = torch.randn(1, 200_000, generator=gen(7))
    gaps = {}
    for bits in range(2, 9):
        spec = GridSpec(bits, "midrise")
        lo, hi = calibrate(x, "mse", spec)
        scale, zp = spec.qparams_from_range(lo, hi)
        gaps[bits] = metrics.rd_gap_db(x, fake_quantize(x, scale[:, None], zp[:, None], spec), bits)
    assert all(g > SCALAR_GAP_DB for g in gaps.values())
    assert all(gaps[b] < gaps[b + 1] for b in range(2, 8))
    # at 4 bits the gap is the one of the best mid-rise grid: 10·log10(0.011543 / 2^−8) = 4.71 dB
    assert gaps[4] == pytest.approx(10 * math.log10(BEST_MIDRISE_4BIT_MSE / 2.0**-8), abs=0.1)
