"""MatMulNBits tensors from specquant's codes: exact round trip, onnxruntime's product, refusals."""
import re

import pytest
import torch

from specquant.core.grid import Granularity, GridSpec
from specquant.core.layouts import RowsLayout
from specquant.core.nbits import MAX_BLOCK_2BIT, ROW_BLOCK, nbits_reason, nbits_weight
from specquant.core.quantizer import quantize_tensor
from specquant.core.qweight import QuantizedWeight

CASES = [  # (bits, granularity, symmetric, K): groups that are powers of two, multiples of 16, ragged, rows
    (4, "group:32", True, 96), (4, "group:32", False, 100), (4, "group:48", True, 100), (4, "channel", True, 70),
    (4, "tensor", False, 64), (4, "group:128", True, 40), (2, "group:16", True, 64), (2, "group:512", False, 600),
    (8, "channel", True, 33), (8, "group:64", False, 200), (2, "channel", False, 300),
]


def _qw(bits, gran, sym, K, N=12, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return quantize_tensor(torch.randn(N, K, generator=g), bits=bits, granularity=gran, symmetric=sym, **kw)


@pytest.mark.parametrize("bits,gran,sym,K", CASES)
def test_round_trip_is_exact(bits, gran, sym, K):
    qw = _qw(bits, gran, sym, K)
    nw = nbits_weight(qw, "fc")
    codes, scales, zp = nw.decode()
    assert torch.equal(codes, qw.codes)  # the very codes
    # each block carries its group's scale and zero point, unchanged
    per_entry = lambda t: t.repeat_interleave(nw.block_size, dim=1)[:, :K]  # noqa: E731  (N, K)
    assert torch.equal(per_entry(scales), qw.granularity.per_entry(qw.scale, (12, K)))
    assert torch.equal(per_entry(zp), qw.granularity.per_entry(qw.zero_point, (12, K)))
    assert torch.equal(nw.dequantize(), qw.dequantize())  # the same float operations as the fake-quant weight
    assert nw.block_size >= 16 and nw.block_size & (nw.block_size - 1) == 0
    assert nw.B.shape == (12, nw.n_blocks, nw.block_size * bits // 8)
    if bits == 2:
        assert nw.block_size <= MAX_BLOCK_2BIT


def test_block_sizes_and_zero_point_kinds():
    assert nbits_weight(_qw(4, "group:32", True, 96)).block_size == 32
    nw = nbits_weight(_qw(4, "group:48", True, 96))  # 48 = 3·16: each scale over three blocks of 16
    assert (nw.block_size, nw.blocks_per_group) == (16, 3)
    assert nbits_weight(_qw(4, "channel", True, 1000)).block_size == ROW_BLOCK
    assert nbits_weight(_qw(4, "channel", True, 20)).block_size == 32  # the power of two >= K
    assert nbits_weight(_qw(4, "channel", True, 64)).zero_point_kind == "default"  # narrow grid: 8, implicit
    assert nbits_weight(_qw(4, "group:32", False, 64)).zero_point_kind == "uint8"
    # bytes: codes + float32 scales (+ packed zero points), nothing else
    nw = nbits_weight(_qw(4, "group:32", False, 96))
    assert nw.nbytes() == 12 * 96 // 2 + 12 * 3 * 4 + 12 * 2


def _midrise(bits, K=64, N=8):
    """A 'midrise' weight (half-integer zero points) built directly."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8)
    scale = torch.rand(N, 1, generator=g) + 0.1
    zp = torch.full((N, 1), ((1 << bits) - 1) / 2)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zp, spec=GridSpec(bits, "midrise"),
                           granularity=Granularity("channel"))


def test_float_zero_points_at_2_and_4_bits_only():
    nw = nbits_weight(_midrise(4))
    assert nw.zero_point_kind == "float"
    assert torch.equal(nw.dequantize(), _midrise(4).dequantize())
    with pytest.raises(ValueError, match=r"^layer 'fc': .*non-integer zero points.* not 8$"):
        nbits_weight(_midrise(8), "fc")


@pytest.mark.parametrize("make,pattern", [
    (lambda: _qw(3, "channel", True, 64), r"3-bit; onnxruntime's MatMulNBits runs 2, 4, 8-bit"),
    (lambda: _qw(1, "channel", True, 64), r"1-bit"),
    (lambda: _qw(4, "group:20", True, 64), r"group size 20 is not a multiple of 16"),
    (lambda: _qw(4, "group:8", True, 64), r"group size 8 is not a multiple of 16"),
    (lambda: QuantizedWeight(codes=torch.full((4, 32), 2, dtype=torch.uint8), scale=torch.ones(4, 1),
                             zero_point=torch.full((4, 1), 2.0), spec=GridSpec(4, "narrow"),
                             granularity=Granularity("channel"), layout=RowsLayout([2, 2, 4, 4], (4, 32))),
     r"rows layout"),
    (lambda: quantize_tensor(torch.randn(6, 2, 8), bits=4), r"2-D \(out, in\) weights"),  # a conv weight
])
def test_refusals_are_one_line_naming_the_layer(make, pattern):
    qw = make()
    assert nbits_reason(qw) is not None
    with pytest.raises(ValueError) as e:
        nbits_weight(qw, "blocks.3.fc")
    msg = str(e.value)
    assert msg.startswith("layer 'blocks.3.fc': ") and "\n" not in msg
    assert re.search(pattern, msg), msg


@pytest.mark.parametrize("bits,gran,sym,K", CASES)
def test_onnxruntime_multiplies_by_the_fake_quant_weight(ort, bits, gran, sym, K):
    """onnxruntime's MatMulNBits on these tensors = A @ dequantized Wᵀ within float32 rounding of the sums:
    |error| <= K·eps·Σ|a||w| (a loose form of the standard dot-product bound)."""
    from specquant.nn.ort_kernel import build_session

    qw = _qw(bits, gran, sym, K)
    nw = nbits_weight(qw)
    a = torch.randn(5, K, generator=torch.Generator().manual_seed(2))
    y = torch.from_numpy(build_session(nw, 1).run(None, {"A": a.numpy()})[0])
    w = qw.dequantize()
    ref = a.double() @ w.double().T
    bound = K * torch.finfo(torch.float32).eps * (a.abs().double() @ w.abs().double().T) + 1e-30
    assert bool(((y.double() - ref).abs() <= bound).all()), float(((y.double() - ref).abs() / bound).max())
