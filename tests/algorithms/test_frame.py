import dataclasses

import pytest
import torch

from specquant.algorithms.frame import FrameConfig, FrameQuantizedWeight, quantize_bias, quantize_weight
from specquant.core.qweight import QuantizedWeight


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def W():
    return torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) / 40**0.5


@pytest.mark.parametrize("order,bits", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_error_decreases_with_redundancy(W, order, bits):
    errs = [_rel(quantize_weight(W, None, FrameConfig(bits=bits, order=order, redundancy=r)).dequantize(), W)
            for r in (2, 4, 8, 16)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.15 * errs[0], errs


def test_second_order_beats_first_at_high_redundancy(W):
    e1 = _rel(quantize_weight(W, None, FrameConfig(bits=2, order=1, redundancy=16)).dequantize(), W)
    e2 = _rel(quantize_weight(W, None, FrameConfig(bits=2, order=2, redundancy=16)).dequantize(), W)
    assert e2 < e1 / 2


@pytest.mark.parametrize("bits,redundancy", [(1, 1), (1, 4), (2, 2.5), (4, 3)])
def test_storage_accounting(W, bits, redundancy):
    q = quantize_weight(W, None, FrameConfig(bits=bits, redundancy=redundancy))
    d, out = W.shape[1], W.shape[0]
    N = q.frame_size
    assert N == int(-(-redundancy * d // 1)) and q.codes.shape == (N, out) and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) < 2**bits
    assert q.storage_bits(16) == bits * N * out + 16 * out  # codes + one fp16 δ per row
    assert q.bits_per_weight(16) == pytest.approx(bits * N / d + 16 / d)
    assert q.num_weights() == W.numel() and q.shape == tuple(W.shape)
    qt = quantize_weight(W, None, FrameConfig(bits=bits, redundancy=redundancy, granularity="tensor"))
    assert qt.bits_per_weight(16) == pytest.approx(bits * N / d + 16 / W.numel())


def test_quantized_weight_contents(W):
    q = quantize_weight(W, None, FrameConfig(bits=2, redundancy=3, order=2))
    assert isinstance(q, FrameQuantizedWeight) and isinstance(q, QuantizedWeight)
    assert (q.frame_kind, q.frame_dim, q.frame_size, q.order, q.along) == ("harmonic", 40, 120, 2, "input")
    assert q.scale.shape == (1, 24) and q.algorithm == "frame"
    W_hat = q.dequantize()
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype
    # the reconstruction is (d/N)·F·q exactly
    F = q.frame()
    assert torch.allclose(W_hat.double(), ((F @ q.coefficients()) * (40 / 120)).T, atol=1e-6)


def test_conv_output_dim_random_frame_and_bias():
    g = torch.Generator().manual_seed(1)
    Wc = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    for dim in ("input", "output"):
        q = quantize_weight(Wc, None, FrameConfig(bits=2, redundancy=8, dim=dim, frame="random", seed=5))
        assert q.dequantize().shape == Wc.shape and q.dequantize().dtype == torch.float64
        assert q.codes.shape == ((36 if dim == "input" else 8) * 8, 8 if dim == "input" else 36)
        assert _rel(q.dequantize(), Wc) < 0.5
    b = torch.randn(10, generator=g)
    qb = quantize_bias(b, FrameConfig(bits=1, redundancy=16, order=2))
    assert qb.codes.shape == (160, 1) and qb.along == "bias"
    assert qb.dequantize().shape == b.shape and _rel(qb.dequantize(), b) < 0.2
    assert qb.bits_per_weight(16) == pytest.approx(16 + 16 / 10)


def test_zero_rows_and_harmonic_is_deterministic(W):
    Wz = W.clone()
    Wz[3] = 0
    q = quantize_weight(Wz, None, FrameConfig(bits=1, redundancy=2))
    assert q.dequantize()[3].abs().max() == 0
    q2 = quantize_weight(Wz, None, FrameConfig(bits=1, redundancy=2))
    assert torch.equal(q.codes, q2.codes)


@pytest.mark.parametrize("bad,match", [
    (dict(redundancy=0.5), "redundancy"),
    (dict(redundancy=float("nan")), "redundancy"),
    (dict(bits=0), "bits"),
    (dict(bits=9), "bits"),
    (dict(order=3), "order"),
    (dict(frame="gabor"), "frame"),
    (dict(step="mean"), "step"),
    (dict(dim="both"), "dim"),
    (dict(granularity="group:8"), "granularity"),
    (dict(step_scale=0), "step_scale"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        FrameConfig(**bad)


def test_bad_input(W):
    cfg = FrameConfig(bits=1, redundancy=2)
    with pytest.raises(ValueError, match="redundancy"):
        quantize_weight(W, None, dataclasses.replace(cfg, redundancy=0.9))
    bad = FrameConfig(bits=1)
    bad.bits = 12  # mutated after construction: still one clear error
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(W, None, bad)
    with pytest.raises(ValueError, match="can be built"):
        quantize_weight(torch.zeros(2, 1 << 14), None, FrameConfig(redundancy=1024))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(torch.full((2, 3), float("nan")), None, cfg)
    with pytest.raises(ValueError, match="dims"):
        quantize_weight(torch.zeros(5), None, cfg)
    with pytest.raises(ValueError, match="1-D"):
        quantize_bias(torch.zeros(2, 2), cfg)
    with pytest.raises(TypeError):
        quantize_weight(W, None, object())
