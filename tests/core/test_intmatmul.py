"""Integer matmul with zero-point expansion equals the dequantized float product."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.intmatmul import (
    int_linear,
    int_matmul,
    integer_product,
    quantize_activations_dynamic,
)
from specquant.core.quantizer import quantize_tensor


def _codes(shape, bits, g):
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def _params(n, per, symmetric, bits, g):
    """Scale and zero point: one value or n of them; symmetric grids use a fixed zero point."""
    k = n if per else 1
    scale = torch.rand(k, generator=g, dtype=torch.float64) * 0.1 + 1e-3
    if symmetric:
        zp = torch.full((k,), float(1 << (bits - 1)), dtype=torch.float64)
    else:
        zp = torch.randint(0, 1 << bits, (k,), generator=g).to(torch.float64)
    return scale, zp


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 20), k=st.integers(1, 70), n=st.integers(1, 20),
    bits_a=st.integers(1, 8), bits_b=st.integers(1, 8),
    per_a=st.booleans(), per_b=st.booleans(), symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_equals_dequantized_product(m, k, n, bits_a, bits_b, per_a, per_b, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    qa, qb = _codes((m, k), bits_a, g), _codes((k, n), bits_b, g)
    sa, za = _params(m, per_a, symmetric, bits_a, g)
    sb, zb = _params(n, per_b, symmetric, bits_b, g)
    a = sa.reshape(-1, 1) * (qa.double() - za.reshape(-1, 1))  # (M, K)
    b = sb.reshape(1, -1) * (qb.double() - zb.reshape(1, -1))  # (K, N)
    ref = a @ b  # (M, N) float64
    out64 = int_matmul(qa, sa, za, qb, sb, zb, out_dtype=torch.float64)
    assert out64.shape == (m, n) and out64.dtype == torch.float64
    tol = 1e-12 * (a.abs() @ b.abs()).max().item() + 1e-300
    assert (out64 - ref).abs().max().item() <= tol
    out32 = int_matmul(qa, sa.float(), za.float(), qb, sb.float(), zb.float())  # default float32
    assert out32.dtype == torch.float32
    scale = (a.abs() @ b.abs()).max().item()
    assert (out32.double() - ref).abs().max().item() <= 1e-5 * scale + 1e-30


def test_half_integer_zero_points_are_exact():
    # mid-rise grids have zero point (2^b - 1)/2
    g = torch.Generator().manual_seed(0)
    qa, qb = _codes((5, 33), 4, g), _codes((33, 6), 3, g)
    sa, sb = torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    za, zb = 7.5, torch.full((6,), 3.5, dtype=torch.float64)
    ref = (sa * (qa.double() - za)) @ (sb * (qb.double() - zb))
    out = int_matmul(qa, sa, za, qb, sb, zb, out_dtype=torch.float64)
    assert torch.equal(out, ref)  # dyadic values: both sides exact


def test_integer_product_accumulates_in_int32():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (7, 300), generator=g, dtype=torch.int64)
    b = torch.randint(-128, 128, (300, 5), generator=g, dtype=torch.int64)
    p = integer_product(a.to(torch.int8), b.to(torch.int8))
    assert p.value.dtype == torch.int32
    assert p.backend in ("int_mm", "int32")  # a real integer kernel on CPU, not the float fallback
    assert torch.equal(p.value.to(torch.int64), a @ b)


def test_extreme_codes_do_not_overflow():
    # all codes 255 with zero point 0: every product term is 255*255*K
    K = 4096
    qa = torch.full((3, K), 255, dtype=torch.uint8)
    qb = torch.full((K, 2), 255, dtype=torch.uint8)
    out = int_matmul(qa, 1.0, 0.0, qb, 1.0, 0.0, out_dtype=torch.float64)
    assert torch.all(out == 255.0 * 255.0 * K)


def test_int8_codes_and_batched_rows():
    g = torch.Generator().manual_seed(2)
    qa = torch.randint(-128, 128, (2, 3, 16), generator=g).to(torch.int8)  # (..., K)
    qb = _codes((16, 4), 8, g)
    sa = torch.rand(2, 3, 1, generator=g, dtype=torch.float64)
    out = int_matmul(qa, sa, 0.0, qb, 0.1, 128.0, out_dtype=torch.float64)
    ref = (sa * qa.double()) @ (0.1 * (qb.double() - 128))
    assert out.shape == (2, 3, 4)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_dynamic_activation_quantization(bits, symmetric, granularity):
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(3)) * 3 + 0.5
    qa = quantize_activations_dynamic(x, bits=bits, symmetric=symmetric, granularity=granularity)
    q, scale, zp = qa  # unpacks like a tuple
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert scale.shape == ((4, 5, 1) if granularity == "row" else (1, 1, 1))
    assert torch.equal(zp, zp.round())
    err = (scale * (q.float() - zp) - x).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-5))  # min-max range: only rounding error
    if symmetric:
        assert torch.all(zp == 2 ** (bits - 1)) and int(q.min()) >= 1
    assert int(q.max()) <= 2**bits - 1


def test_binary_activations():
    x = torch.tensor([[-2.0, 1.0, 3.0, -1.0]])
    q, scale, zp = quantize_activations_dynamic(x, bits=1, symmetric=True)
    alpha = x.abs().mean()
    assert torch.allclose(scale * (q.float() - zp), torch.sign(x) * alpha)


def test_int_linear_matches_fake_quant_linear():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(3, 7, 40, generator=g)
    for symmetric in (True, False):
        for granularity in ("channel", "tensor"):
            qw = quantize_tensor(w, bits=4, granularity=granularity, symmetric=symmetric, clipping="minmax")
            xa = quantize_activations_dynamic(x, 8)
            ref = (xa.scale * (xa.q.float() - xa.zero_point)) @ qw.dequantize().T
            y = int_linear(x, qw)
            assert y.shape == (3, 7, 24)
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_int_linear_rejects_group_scales():
    qw = quantize_tensor(torch.randn(8, 16), bits=4, granularity=("group", 8), clipping="minmax")
    with pytest.raises(ValueError, match="per-tensor or per-output-channel"):
        int_linear(torch.randn(2, 16), qw)


def test_bad_inputs():
    qa = torch.zeros(2, 3, dtype=torch.uint8)
    qb = torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8 or int8"):
        int_matmul(qa.float(), 1.0, 0.0, qb, 1.0, 0.0)
    with pytest.raises(ValueError, match="do not multiply"):
        int_matmul(qa, 1.0, 0.0, torch.zeros(4, 4, dtype=torch.uint8), 1.0, 0.0)
    with pytest.raises(ValueError, match="one per column"):
        int_matmul(qa, 1.0, 0.0, qb, torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="one per row"):
        int_matmul(qa, torch.ones(3), 0.0, qb, 1.0, 0.0)
    with pytest.raises(ValueError, match="1..8"):
        quantize_activations_dynamic(torch.randn(2, 3), bits=9)
    with pytest.raises(ValueError, match="1 NaN"):
        quantize_activations_dynamic(torch.tensor([[0.0, float("nan")]]))


def test_long_k_is_split_without_overflow(monkeypatch):
    import specquant.core.intmatmul as im

    monkeypatch.setattr(im, "_MAX_K_CHUNK", 7)  # force several chunks
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (4, 30), generator=g, dtype=torch.int64)
    b = torch.randint(-128, 128, (30, 3), generator=g, dtype=torch.int64)
    p = integer_product(a.to(torch.int8), b.to(torch.int8))
    assert p.value.dtype == torch.int64 and p.backend in ("int_mm", "int32")
    assert torch.equal(p.value, a @ b)
