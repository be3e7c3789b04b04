"""quantize_tensor: bad input, constant tensors, binary/ternary grids, granularity, error bounds."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.clipping import CLIPPING_METHODS
from specquant.core.grid import Granularity
from specquant.core.quantizer import quantize_tensor

# (grid kind, bits) for every shape the core offers; the 1-bit "full" grid {−Δ, 0} is left out
# of the constant tests because it has no positive level.
GRIDS = [("narrow", 2), ("narrow", 4), ("narrow", 8), ("full", 2), ("full", 5), ("midrise", 3),
         ("midrise", 8), ("binary", 1), ("asymmetric", 1), ("asymmetric", 4), ("asymmetric", 8)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quant_error(w, qw) -> torch.Tensor:
    return qw.dequantize().double() - w.double()


# --------------------------------------------------------------------------- bad input

def test_nan_and_inf_name_count_and_index():
    w = torch.randn(4, 6, generator=gen(0))
    w[1, 4] = float("nan")
    w[2, 0] = float("nan")
    w[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"fc1\.weight has 3 non-finite value\(s\) \(2 NaN, 1 Inf\) of 24; "
                                         r"first at index \(1, 4\)"):
        quantize_tensor(w, name="fc1.weight")
    w = torch.zeros(5)
    w[3] = -float("inf")
    msg = r"1 non-finite value\(s\) \(0 NaN, 1 Inf\) of 5; first at index \(3,\)"
    with pytest.raises(ValueError, match=msg):
        quantize_tensor(w)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, -3, "4"])
def test_bits_outside_1_to_8_list_the_range(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8, got"):
        quantize_tensor(torch.ones(2, 4), bits=bits)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clipping", ["minmax", "mse", "percentile", "aciq-laplace"])
def test_group_size_need_not_divide(symmetric, clipping):
    """Input dimension 15 at G = 4: groups of 4, 4, 4 and 3, each with the scale of its own weights
    (the last group's scale is the per-channel scale of those 3 inputs alone, not a zero-padded group's)."""
    w = torch.randn(4, 3, 5, generator=gen(1)) + (0.0 if symmetric else 1.5)  # input dimension 15
    qw = quantize_tensor(w, bits=4, granularity="group:4", symmetric=symmetric, clipping=clipping)
    assert qw.scale.shape == qw.zero_point.shape == (4, 4, 1)
    w2 = w.reshape(4, 15)
    for j, (a, b) in enumerate([(0, 4), (4, 8), (8, 12), (12, 15)]):
        alone = quantize_tensor(w2[:, a:b], bits=4, symmetric=symmetric, clipping=clipping)  # per channel
        assert torch.equal(qw.scale[:, j, 0], alone.scale[:, 0]) and torch.equal(qw.zero_point[:, j, 0],
                                                                                alone.zero_point[:, 0])
        assert torch.equal(qw.codes.reshape(4, 15)[:, a:b], alone.codes)
        assert torch.equal(qw.dequantize().reshape(4, 15)[:, a:b], alone.dequantize())
    assert quantize_tensor(w, granularity=("group", 5)).scale.shape == (4, 3, 1)  # a divisor, as before


def test_unknown_names_list_allowed_values():
    w = torch.randn(3, 4, generator=gen(2))
    with pytest.raises(ValueError, match="unknown clipping 'max'; allowed: " + ", ".join(CLIPPING_METHODS)):
        quantize_tensor(w, clipping="max")
    with pytest.raises(ValueError, match="unknown granularity 'row'; allowed"):
        quantize_tensor(w, granularity="row")
    with pytest.raises(ValueError, match="unknown grid kind 'log'; allowed"):
        quantize_tensor(w, grid="log")
    with pytest.raises(ValueError, match="channel axis 2 is out of range"):
        quantize_tensor(w, axis=2)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        quantize_tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match="floating-point"):
        quantize_tensor(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_tensor(torch.ones(0, 3))


# --------------------------------------------------------------------------- constant tensors

@pytest.mark.parametrize("kind, bits", GRIDS)
def test_zero_tensor_quantizes_to_exact_zero(kind, bits):
    w = torch.zeros(3, 8)
    for clipping in CLIPPING_METHODS:
        for gran in ("tensor", "channel", ("group", 4)):
            qw = quantize_tensor(w, bits=bits, grid=kind, clipping=clipping, granularity=gran)
            assert bool((qw.scale == 0).all())  # zero range: scale 0, no division
            assert torch.isfinite(qw.zero_point).all()
            assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("kind, bits", GRIDS)
@pytest.mark.parametrize("c", [1.5, -0.75, 3e-5])
def test_nonzero_constant_is_reproduced(kind, bits, c):
    """A constant c is the outermost level of its grid (|c| = α, or the end of [0, c])."""
    w = torch.full((3, 8), c)
    for clipping in CLIPPING_METHODS:
        for gran in ("tensor", "channel"):
            qw = quantize_tensor(w, bits=bits, grid=kind, clipping=clipping, granularity=gran)
            torch.testing.assert_close(qw.dequantize(), w, rtol=1e-6, atol=0)


def test_per_channel_constants_each_reproduced():
    w = torch.tensor([0.0, 2.0, -1.0, 1e-3])[:, None].expand(4, 16).contiguous()
    for kind, bits in GRIDS:
        qw = quantize_tensor(w, bits=bits, grid=kind, granularity="channel")
        torch.testing.assert_close(qw.dequantize(), w, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- binary and ternary

def test_binary_alpha_is_mean_abs_per_channel_and_mse_optimal():
    w = torch.randn(8, 200, generator=gen(3)) * torch.linspace(0.1, 3.0, 8)[:, None] + 0.05
    qw = quantize_tensor(w, bits=1, granularity="channel")
    assert qw.spec.kind == "binary" and qw.levels == 2
    alpha = w.abs().mean(dim=1, keepdim=True)  # (8, 1)
    torch.testing.assert_close(qw.dequantize(), torch.sign(w) * alpha)
    err = (qw.dequantize() - w).square().sum(dim=1)
    for f in (0.95, 1.05):  # ‖w − α·sign w‖² = ‖w‖² − 2α Σ|w| + nα² is minimal at α = mean|w|
        err_f = (torch.sign(w) * alpha * f - w).square().sum(dim=1)
        assert bool((err_f > err).all())


def test_binary_mse_on_gaussian_is_one_minus_two_over_pi():
    """E[(X − mean|X|·sign X)²] = 1 − (E|X|)² = 1 − 2/π for a unit Gaussian."""
    w = torch.randn(1, 400_000, generator=gen(4))
    qw = quantize_tensor(w, bits=1, granularity="tensor")
    assert float(quant_error(w, qw).square().mean()) == pytest.approx(1 - 2 / math.pi, rel=0.01)


def test_ternary_is_narrow_two_bits_with_three_levels():
    w = torch.randn(6, 64, generator=gen(5))
    qw = quantize_tensor(w, bits=2)  # symmetric default at 2 bits
    assert qw.spec.kind == "narrow" and qw.levels == 3
    assert set(qw.codes.unique().tolist()) <= {1, 2, 3}
    w_hat = qw.dequantize()
    alpha = qw.scale.reshape(6, 1)  # α = Δ for 3 levels {−Δ, 0, Δ}
    for r in range(6):
        assert set(w_hat[r].unique().tolist()) <= {-float(alpha[r]), 0.0, float(alpha[r])}
    assert len(w_hat.unique()) <= 3 * 6


# --------------------------------------------------------------------------- granularity, shapes, dtypes

@pytest.mark.parametrize(
    "gran, axis, scale_shape",
    [("tensor", 0, (1, 1, 1, 1)), ("channel", 0, (8, 1, 1, 1)), ("channel", 1, (1, 4, 1, 1)),
     (("group", 9), 0, (8, 4, 1)), ("group:36", 0, (8, 1, 1))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_conv_weight_shapes_and_dtype(gran, axis, scale_shape, dtype):
    w = torch.randn(8, 4, 3, 3, generator=gen(6)).to(dtype)
    qw = quantize_tensor(w, bits=4, granularity=gran, axis=axis, clipping="minmax")
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == w.shape
    assert tuple(qw.scale.shape) == scale_shape
    w_hat = qw.dequantize()
    assert w_hat.shape == w.shape and w_hat.dtype == dtype
    # min-max narrow grid: the largest |w| of each block is a level, every error ≤ Δ/2
    blocked = Granularity.parse(gran, axis).blocked_shape(tuple(w.shape))
    err = quant_error(w.float(), qw).reshape(blocked).abs()
    cast = torch.finfo(dtype).eps * w.double().abs().reshape(blocked)  # rounding back to dtype
    assert bool((err <= qw.scale.double() / 2 * (1 + 1e-5) + cast).all())


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["narrow", "full", "midrise", "asymmetric"]),
    bits=st.integers(2, 8),
    out=st.integers(1, 5),
    inner=st.sampled_from([1, 2, 6, 12]),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-3, 3),
)
def test_minmax_error_within_half_step_for_every_grid(kind, bits, out, inner, gran, seed, shift):
    w = torch.randn(out, inner, generator=gen(seed)) * 2.0 + shift
    g = ("group", inner // 2 if inner > 1 else 1) if gran == "group" else gran
    qw = quantize_tensor(w, bits=bits, grid=kind, granularity=g, clipping="minmax")
    assert int(qw.codes.min()) >= qw.spec.qmin and int(qw.codes.max()) <= qw.spec.qmax
    blocked = qw.granularity.blocked_shape(tuple(w.shape))
    err = quant_error(w, qw).reshape(blocked).abs()
    assert bool((err <= qw.scale.double() / 2 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("clipping", CLIPPING_METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_clipping_runs_per_channel_and_beats_nothing(clipping, symmetric):
    """Each calibrator gives a finite quantization closer to w than the all-zero tensor."""
    w = torch.randn(6, 128, generator=gen(7)) * torch.linspace(0.5, 2, 6)[:, None]
    qw = quantize_tensor(w, bits=4, symmetric=symmetric, clipping=clipping)
    err = quant_error(w, qw).square().sum(dim=1)
    assert torch.isfinite(qw.dequantize()).all()
    assert bool((err < 0.1 * w.double().square().sum(dim=1)).all())


def test_public_path_reaches_the_best_gaussian_grid():
    """quantize_tensor(clipping="mse") per tensor on 10^6 unit-Gaussian values: within 1.5 % of the
    best 2^4 − 1-level mid-tread grid (0.012889, issue 2)."""
    w = torch.randn(1000, 1000, generator=gen(8))
    qw = quantize_tensor(w, bits=4, granularity="tensor", clipping="mse")
    assert float(quant_error(w, qw).square().mean()) == pytest.approx(0.012889, rel=0.015)


def test_storage_bits_count_codes_and_scales():
    """As a file stores them: float32 scales (the default storage dtype), uint8 zero points when
    asymmetric, none when the symmetric grid fixes them; or at the widths asked for."""
    w = torch.randn(4, 32, generator=gen(9))
    sym = quantize_tensor(w, bits=3, granularity=("group", 8))
    assert sym.storage_bits() == 4 * 32 * 3 + 16 * 32
    assert sym.storage_bits(scale_bits=16) == 4 * 32 * 3 + 16 * 16
    asym = quantize_tensor(w, bits=3, granularity="channel", symmetric=False)
    assert asym.bits_per_weight() == pytest.approx(3 + (32 + 8) * 4 / 128)
    assert asym.bits_per_weight(16, 16) == pytest.approx(3 + 2 * 16 * 4 / 128)  # the fp16-zero-point convention
