"""Spectral diagnostics on matrices with known singular values; the note's bounds as reports."""
import math

import pytest
import torch

from specquant.core.quantizer import quantize_tensor
from specquant.core.spectral import (
    BoundCheck,
    as_matrix,
    condition_number,
    effective_rank,
    frobenius_error_bound,
    lock_bits,
    op_error_bound,
    operator_norm,
    singular_values,
    smallest_singular_value,
    spectral_norm_quantize,
    spectral_summary,
    stable_rank,
)


def _with_singular_values(s, m, n, seed=0):
    """U diag(s) Vᵀ (m, n) with orthonormal U, V from QR of Gaussian matrices (float64)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    r = s.numel()
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T


@pytest.mark.parametrize("m,n", [(8, 8), (12, 5), (5, 12)])
def test_known_spectrum(m, n):
    r = min(m, n)
    s = torch.logspace(1, -2, r, dtype=torch.float64)  # 10 … 0.01, κ = 1000
    w = _with_singular_values(s, m, n)
    assert torch.allclose(singular_values(w), s, rtol=1e-10, atol=0)
    assert operator_norm(w) == pytest.approx(10.0, rel=1e-10)
    assert smallest_singular_value(w) == pytest.approx(0.01, rel=1e-6)
    assert condition_number(w) == pytest.approx(1000.0, rel=1e-6)
    tau = 0.05  # σ_i > 0.5
    assert effective_rank(w, tau) == int((s > 0.5).sum())
    assert stable_rank(w) == pytest.approx(float((s**2).sum() / 100.0), rel=1e-6)
    summ = spectral_summary(w, tau)
    assert summ.shape == (m, n)
    assert summ.condition_number == pytest.approx(1000.0, rel=1e-6)
    assert summ.effective_rank == effective_rank(w, tau)
    assert summ.stable_rank == pytest.approx(stable_rank(w), rel=1e-12)
    assert summ.frobenius_norm == pytest.approx(float(torch.linalg.norm(w)), rel=1e-12)


def test_ranks_of_low_rank_matrix():
    s = [4.0, 2.0, 1.0, 1e-5]  # rank 4 in a 10 x 9 matrix
    w = _with_singular_values(s, 10, 9, seed=1)
    assert smallest_singular_value(w) == 0.0  # the 9th singular value is zero
    assert condition_number(w) == math.inf
    assert effective_rank(w) == 3  # default tau = 1e-3: 1e-5 < 4e-3
    assert effective_rank(w, tau=1e-7) == 4
    assert stable_rank(w) == pytest.approx((16 + 4 + 1 + 1e-10) / 16, rel=1e-9)


def test_identity_and_zero():
    eye = torch.eye(6)
    assert condition_number(eye) == pytest.approx(1.0)
    assert effective_rank(eye) == 6 and stable_rank(eye) == pytest.approx(6.0)
    z = torch.zeros(3, 4)
    assert operator_norm(z) == 0.0 and condition_number(z) == math.inf
    assert effective_rank(z) == 0 and stable_rank(z) == 0.0


def test_conv_weight_is_viewed_as_out_by_in_k():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    mat = _with_singular_values(s, 4, 2 * 3 * 3, seed=2)  # (out=4, in*kh*kw=18)
    conv = mat.reshape(4, 2, 3, 3)
    assert as_matrix(conv).shape == (4, 18)
    assert torch.allclose(singular_values(conv), s, rtol=1e-10)
    assert condition_number(conv) == pytest.approx(6.0, rel=1e-9)
    assert condition_number(conv.float()) == pytest.approx(6.0, rel=1e-5)  # float32 input works
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        operator_norm(torch.ones(5))


def test_non_finite_weight_is_rejected():
    w = torch.ones(3, 3)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="1 Inf"):
        condition_number(w)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bounds_report_measured_over_bound(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    qw = quantize_tensor(w, bits=bits, granularity="tensor", clipping="minmax")
    w_hat = qw.dequantize()
    e = w - w_hat
    op = op_error_bound(w, qw, bits)  # a QuantizedWeight is dequantized
    assert isinstance(op, BoundCheck) and op.norm == "op" and op.bits == bits
    assert op.measured == pytest.approx(float(torch.linalg.svdvals(e)[0]), rel=1e-10)
    assert op.bound == pytest.approx(float(torch.linalg.svdvals(w)[0]) / 2**bits, rel=1e-10)
    assert op.ratio == pytest.approx(op.measured / op.bound, rel=1e-12)
    assert op.holds == (op.ratio <= 1)
    fro = frobenius_error_bound(w, w_hat, bits)
    assert fro.measured == pytest.approx(float(e.norm()), rel=1e-10)
    assert fro.bound == pytest.approx(math.sqrt(w.numel()) * float(w.abs().max()) / 2**bits, rel=1e-10)
    assert fro.ratio == pytest.approx(fro.measured / fro.bound, rel=1e-12)


def test_frobenius_bound_holds_for_the_notes_own_quantizer():
    # Q_b of the note: 2^b steps over [min, max], nearest rounding -> |e_ij| <= Δ/2 <= max|w|/2^b
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for bits in range(1, 9):
        lo, hi = w.min(), w.max()
        delta = (hi - lo) / 2**bits
        w_hat = lo + torch.round((w - lo) / delta) * delta
        check = frobenius_error_bound(w, w_hat, bits)
        assert check.holds and check.ratio <= 1


def test_op_bound_is_reported_even_when_it_fails():
    # A random Gaussian matrix: RTN error is nearly white noise whose op norm is ~ (√m+√n)Δ/√12,
    # far above ‖W‖_op/2^b at low bits.  The function reports that, it does not assume the bound.
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(8))
    check = op_error_bound(w, quantize_tensor(w, bits=2, granularity="tensor", clipping="minmax"), 2)
    assert check.ratio > 1 and not check.holds


def test_zero_bound_ratio():
    z = torch.zeros(2, 2)
    assert op_error_bound(z, z, 4).ratio == 0.0
    assert frobenius_error_bound(z, torch.ones(2, 2), 4).ratio == math.inf
    with pytest.raises(ValueError, match="differ in shape"):
        op_error_bound(z, torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="1..8"):
        op_error_bound(z, z, 0)


def test_spectral_norm_quantize_absorbs_operator_norm():
    s = torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    w = _with_singular_values(s, 6, 3, seed=9).float()
    qw = spectral_norm_quantize(w, 4, granularity="channel", clipping="minmax")
    inner = quantize_tensor(w / 5.0, 4, granularity="channel", clipping="minmax")
    assert qw.info["spectral_norm"] == pytest.approx(5.0, rel=1e-6)
    assert torch.equal(qw.codes, inner.codes)
    assert torch.allclose(qw.scale, inner.scale * 5.0, rtol=1e-6)
    assert torch.allclose(qw.dequantize(), 5.0 * inner.dequantize(), rtol=1e-5, atol=1e-6)
    # min-max grids are scale-equivariant: Q_b^spec(W) equals Q_b(W) up to float rounding
    assert torch.allclose(qw.dequantize(), quantize_tensor(w, 4, clipping="minmax").dequantize(),
                          atol=1e-5)
    zero = spectral_norm_quantize(torch.zeros(3, 3), 4, clipping="minmax")
    assert torch.equal(zero.dequantize(), torch.zeros(3, 3))


def test_lock_bits_is_the_ceiling_of_log2_kappa():
    assert [lock_bits(k) for k in (0.5, 1.0, 1.5, 2.0, 3.0, 1024.0, 1025.0)] == [0, 0, 1, 1, 2, 10, 11]
    assert lock_bits(math.inf) is None and lock_bits(math.nan) is None
    lin = torch.diag(torch.tensor([32.0, 4.0, 1.0], dtype=torch.float64))
    assert lock_bits(condition_number(lin)) == 5
