"""Packed layers: same outputs as the fake-quant model, packed memory, the int8 path = core int matmul."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.algorithms.frame import FrameConfig
from specquant.core.grid import GridSpec
from specquant.core.intmatmul import int_linear, int_matmul, quantize_activations_dynamic
from specquant.core.layouts import FrameLayout, RowsLayout, grid_layout
from specquant.core.pack import packed_nbytes, trits_nbytes
from specquant.core.quantizer import quantize_tensor
from specquant.core.qweight import QuantizedWeight
from specquant.engine.apply import quantize
from specquant.nn import PackedWeight, QuantConv1d, QuantConv2d, QuantLinear, convert, memory_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(n_in, n_out, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def _small_convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6),
    ).eval()


def _set_bn_stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("tensor", True), ("group:8", True),
                                                   ("channel", False), ("group:16", True), ("group:16", False)])
def test_linear_equals_dequantized(bits, granularity, symmetric):  # group:16 of 40 inputs: 16, 16 and 8
    lin = _linear(40, 12)
    qw = quantize_tensor(lin.weight.detach(), bits=bits, granularity=granularity, symmetric=symmetric,
                         clipping="minmax")
    ql = QuantLinear.from_quantized(lin, qw)
    w_ref = qw.dequantize()
    assert torch.equal(ql.dequantized_weight(), w_ref)
    assert torch.equal(ql.packed.unpack(), qw.codes)
    x = torch.randn(3, 5, 40)
    assert torch.equal(ql(x), F.linear(x, w_ref, lin.bias))
    back = ql.to_quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert torch.equal(back.zero_point, qw.zero_point)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_memory_is_packed_size(bits):
    lin = _linear(96, 64)
    qw = quantize_tensor(lin.weight.detach(), bits=bits, clipping="minmax")
    ql = QuantLinear.from_quantized(lin, qw)
    packed = grid_layout(qw.spec, (64, 96)).nbytes()  # 3-level codes five per byte, else bits each
    assert packed == (packed_nbytes(96 * 64, bits) if bits != 2 else (96 * 64 + 4) // 5)
    assert memory_bytes(ql) == packed + 64 * 4 + 64 * 4  # codes + fp32 scales + fp32 bias
    assert memory_bytes(ql) < memory_bytes(lin) * (bits / 32 + 0.1)
    ql(torch.randn(2, 96))
    assert memory_bytes(ql) == packed + 64 * 4 + 64 * 4  # nothing cached by default


def test_cache_dequantized_counts_and_clears():
    lin = _linear(32, 16)
    ql = QuantLinear.from_quantized(lin, quantize_tensor(lin.weight.detach(), bits=4), cache_dequantized=True)
    base = memory_bytes(ql)
    x = torch.randn(4, 32)
    y0 = ql(x)
    assert memory_bytes(ql) == base + 32 * 16 * 4
    assert torch.equal(ql(x), y0)
    ql.clear_cache()
    assert memory_bytes(ql) == base


@pytest.mark.parametrize("bits,granularity", [(3, "channel"), (4, "group:9"), (8, "tensor"), (5, "channel"),
                                              (2, "channel"), (4, "group:128"), (8, "group:100"), (3, "group:64")])
def test_chunked_large_linear(bits, granularity):  # group:128 of 513 inputs: the last group holds one input
    # 520·513 weights > CHUNK_WEIGHTS: dequantized in row chunks; odd K makes rows straddle bytes
    lin = _linear(513, 520)
    qw = quantize_tensor(lin.weight.detach(), bits=bits, granularity=granularity, symmetric=bits != 3,
                         clipping="minmax")
    ql = QuantLinear.from_quantized(lin, qw, kernel="torch")  # the chunked PyTorch path (4 bits: not onnxruntime's)
    assert ql.packed.row_chunks == (bits != 2)  # 3-level codes (trits) are dequantized whole
    x = torch.randn(3, 513)
    ref = F.linear(x, qw.dequantize(), lin.bias)
    assert torch.equal(ql(x), ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_int8_linear_equals_core_int_matmul(symmetric, granularity):
    lin = _linear(70, 30)
    qw = quantize_tensor(lin.weight.detach(), bits=8, granularity=granularity, symmetric=symmetric,
                         clipping="minmax")
    ql = QuantLinear.from_quantized(lin, qw, mode="int8_dynamic")
    x = torch.randn(2, 9, 70)
    ref = int_linear(x, qw) + lin.bias
    torch.testing.assert_close(ql(x), ref, rtol=1e-6, atol=1e-6)
    # and close to the float product with the dequantized weight (8-bit activations)
    yf = F.linear(x, qw.dequantize(), lin.bias)
    assert (ql(x) - yf).norm() / yf.norm() < 0.02


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_conv_equals_core_int_matmul(symmetric):
    # activations: per sample, symmetric 8-bit, quantized before im2col (zero padding stays 0)
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    qw = quantize_tensor(conv.weight.detach(), bits=8, symmetric=symmetric, clipping="minmax")
    qc = QuantConv2d.from_quantized(conv, qw, mode="int8_dynamic")
    x = torch.randn(2, 5, 9, 9)
    xa = quantize_activations_dynamic(x.reshape(2, -1), 8, symmetric=True)
    centered = (xa.q.float() - 128).reshape(x.shape)  # −127..127
    cols = F.unfold(centered, 3, 1, 1, 2).transpose(1, 2)  # (B, L, K), padding = 0
    qa = (cols + 128).to(torch.uint8)  # codes with zero point 128
    sa = xa.scale.reshape(2, 1, 1).expand(2, cols.shape[1], 1)
    ref = int_matmul(qa, sa, 128.0, qw.codes.reshape(7, -1).T, qw.scale, qw.zero_point) + conv.bias
    ref = ref.transpose(1, 2).reshape(2, 7, 5, 5)
    torch.testing.assert_close(qc(x), ref, rtol=1e-6, atol=1e-6)
    yf = F.conv2d(x, qw.dequantize(), conv.bias, stride=2, padding=1)
    assert (qc(x) - yf).norm() / yf.norm() < 0.02


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_conv_with_a_shorter_last_group(bits, symmetric):
    """Conv2d(8, 6, 3): 72 inputs per output channel in groups of 32, 32 and 8 along in·kh·kw."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    qw = quantize_tensor(conv.weight.detach(), bits=bits, granularity="group:32", symmetric=symmetric)
    assert tuple(qw.scale.shape) == (6, 3, 1)
    qc = QuantConv2d.from_quantized(conv, qw)
    assert torch.equal(qc.dequantized_weight(), qw.dequantize())
    x = torch.randn(2, 8, 7, 7)
    assert torch.equal(qc(x), F.conv2d(x, qw.dequantize(), conv.bias, padding=1))
    back = qc.to_quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)


def test_float16_scales_are_held_as_stored():
    """A weight quantized with float16 scales keeps them in float16 (half the scale memory) and
    computes with exactly the values its QuantizedWeight dequantizes with."""
    from specquant.algorithms import rtn

    lin = _linear(64, 32)
    qw = rtn.quantize_weight(lin.weight.detach(), None, RTNConfig(bits=4, granularity="group:24",
                                                                  symmetric=False, scale_dtype="fp16"))
    assert qw.scale_dtype == torch.float16 and qw.scale.dtype == torch.float32
    ql = QuantLinear.from_quantized(lin, qw)
    assert ql.packed.scale.dtype == torch.float16
    assert memory_bytes(ql) == packed_nbytes(64 * 32, 4) + 32 * 3 * (2 + 4) + 32 * 4  # codes, fp16 scales, zps, bias
    assert torch.equal(ql.dequantized_weight(), qw.dequantize())
    assert ql.to_quantized_weight().scale_dtype == torch.float16
    with pytest.raises(ValueError, match="not exact in float16"):
        QuantizedWeight(codes=qw.codes, scale=qw.scale * 1.0001, zero_point=qw.zero_point, spec=qw.spec,
                        granularity=qw.granularity, scale_dtype=torch.float16)


def test_int8_mode_refuses_ineligible_layers():
    lin = _linear(16, 8)
    with pytest.raises(ValueError, match="8-bit"):
        QuantLinear.from_quantized(lin, quantize_tensor(lin.weight.detach(), bits=4), mode="int8_dynamic")
    with pytest.raises(ValueError, match="groups"):
        QuantLinear.from_quantized(lin, quantize_tensor(lin.weight.detach(), bits=8, granularity="group:8"),
                                   mode="int8_dynamic")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_layers_equal_dequantized(padding_mode):
    torch.manual_seed(0)
    c2 = nn.Conv2d(6, 4, 3, padding=1, groups=2, padding_mode=padding_mode)
    c1 = nn.Conv1d(3, 5, 5, padding=2, dilation=1, padding_mode=padding_mode)
    for conv, cls, x in ((c2, QuantConv2d, torch.randn(2, 6, 7, 7)), (c1, QuantConv1d, torch.randn(2, 3, 11))):
        qw = quantize_tensor(conv.weight.detach(), bits=3, clipping="minmax")
        qc = cls.from_quantized(conv, qw)
        conv.weight.data.copy_(qw.dequantize())
        assert torch.equal(qc(x), conv(x))


def _engine_quantized(model, config, x):
    m = copy.deepcopy(model)
    quantize(m, config, calib=x, progress=False)
    return m


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "gpfq"])
def test_convert_matches_fake_quant_model(bits, method):
    mlp, conv = _small_mlp(), _set_bn_stats(_small_convnet())
    g = torch.Generator().manual_seed(0)
    cases = ((mlp, torch.randn(64, 24, generator=g)), (conv, torch.randn(16, 4, 8, 8, generator=g)))
    for model, x in cases:
        cfg = RTNConfig(bits=bits) if method == "rtn" else GPFQConfig(bits=bits)
        fq = _engine_quantized(model, cfg, x)
        qnames = [n for n, m in fq.named_modules() if hasattr(m, "qweight")]
        packed = convert(copy.deepcopy(fq), kernel="torch")
        mods = dict(packed.named_modules())
        for n in qnames:
            assert isinstance(mods[n], (QuantLinear, QuantConv2d))
            assert torch.equal(mods[n].packed.unpack(), dict(fq.named_modules())[n].qweight.codes)
        with torch.no_grad():
            assert torch.equal(packed(x), fq(x))  # the PyTorch path: bit-identical
            # the default kernel choice (onnxruntime's MatMulNBits for 4-bit Linear layers, when installed):
            # the same up to float rounding of the sums
            torch.testing.assert_close(convert(copy.deepcopy(fq))(x), fq(x), rtol=1e-5, atol=1e-6)
        n_weights = sum(math.prod(mods[n].weight_shape) for n in qnames)
        codes_bytes = sum(mods[n].packed.codes.numel() for n in qnames)
        numels = [math.prod(mods[n].weight_shape) for n in qnames]  # 3-level codes five per byte
        assert codes_bytes == sum(trits_nbytes(k) if bits == 2 else packed_nbytes(k, bits) for k in numels)
        assert codes_bytes <= n_weights * (1.6 if bits == 2 else bits) / 8 + len(qnames)


def test_convert_int8_dynamic_model_close_to_fake_quant():
    model, x = _small_mlp(), torch.randn(32, 24)
    fq = _engine_quantized(model, RTNConfig(bits=8), x)
    packed = convert(copy.deepcopy(fq), int8_dynamic=True)
    assert all(m.mode == "int8_dynamic" for m in packed.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        y, ref = packed(x), fq(x)
    assert (y - ref).norm() / ref.norm() < 0.02


def test_convert_int8_dynamic_choices_on_a_conv_net():
    model, x = _set_bn_stats(_small_convnet()), torch.randn(8, 4, 8, 8)
    fq = _engine_quantized(model, RTNConfig(bits=8), x)
    lin_only = convert(copy.deepcopy(fq), int8_dynamic=True)
    assert lin_only[10].mode == "int8_dynamic" and lin_only[0].mode == "weight_only"
    every = convert(copy.deepcopy(fq), int8_dynamic="all")
    assert every[0].mode == every[6].mode == every[10].mode == "int8_dynamic"
    assert every[3].mode == "weight_only"  # grouped convolution: weight-only
    with torch.no_grad():
        ref = fq(x)
        for m in (lin_only, every):
            assert (m(x) - ref).norm() / ref.norm() < 0.03
    with pytest.raises(ValueError, match="int8_dynamic must be"):
        convert(copy.deepcopy(fq), int8_dynamic="convs")


def test_frame_quantized_layers_convert():
    model = _set_bn_stats(_small_convnet())
    model[3] = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # frame weights: groups=1 only
    x = torch.randn(8, 4, 8, 8)
    fq = _engine_quantized(model, FrameConfig(bits=3), x)
    packed = convert(copy.deepcopy(fq))
    layer = packed[0]
    assert isinstance(layer.packed.layout, FrameLayout) and layer.int8_eligible() is not None
    assert layer.packed.layout == fq[0].qweight.layout
    assert torch.equal(layer.packed.unpack(), fq[0].qweight.codes)
    assert memory_bytes(layer) < memory_bytes(fq[0])
    with torch.no_grad():
        assert torch.equal(packed(x), fq(x))


def _rows_quantized(w: torch.Tensor, widths, symmetric=True) -> QuantizedWeight:
    """Each row of ``w`` quantized on the default grid of its own width (what the engine's mixed rows do)."""
    parts = [quantize_tensor(w[r:r + 1], bits=b, symmetric=symmetric, clipping="minmax") for r, b in enumerate(widths)]
    return QuantizedWeight(codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
                           zero_point=torch.cat([p.zero_point for p in parts]),
                           spec=GridSpec.default(max(widths), symmetric), granularity=parts[0].granularity,
                           layout=RowsLayout(widths, tuple(w.shape), symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
def test_rows_layout_layer_equals_dequantized(symmetric):
    lin = _linear(40, 12)
    widths = (2, 8, 3, 2, 1, 4, 8, 2, 5, 6, 7, 3)
    qw = _rows_quantized(lin.weight.detach(), widths, symmetric)
    ql = QuantLinear.from_quantized(lin, qw)
    layout = ql.packed.layout
    assert layout == qw.layout and torch.equal(ql.packed.row_bits, torch.tensor(widths, dtype=torch.uint8))
    assert ql.packed.codes.numel() == layout.nbytes() < packed_nbytes(12 * 40, 8)
    assert torch.equal(ql.packed.unpack(), qw.codes)
    assert torch.equal(ql.dequantized_weight(), qw.dequantize())
    x = torch.randn(3, 40)
    assert torch.equal(ql(x), F.linear(x, qw.dequantize(), lin.bias))
    back = ql.to_quantized_weight()
    assert back.layout == qw.layout and torch.equal(back.codes, qw.codes) and torch.equal(back.row_bits, qw.row_bits)
    # codes + scales + zero points (rows of different widths have different ones) + widths + bias
    assert memory_bytes(ql) == layout.nbytes() + 12 * 4 + 12 * 4 + 12 + 12 * 4
    assert "8-bit" in ql.int8_eligible()


def test_rows_layout_of_8_bit_rows_runs_int8():
    # every row at 8 bits: one byte per code, so the int8 path runs on the same bytes
    lin = _linear(40, 12)
    qw = _rows_quantized(lin.weight.detach(), (8,) * 12)
    ql = QuantLinear.from_quantized(lin, qw, mode="int8_dynamic")
    ref = int_linear(torch.ones(2, 40), quantize_tensor(lin.weight.detach(), bits=8, clipping="minmax"))
    torch.testing.assert_close(ql(torch.ones(2, 40)), ref + lin.bias, rtol=1e-6, atol=1e-6)


def test_packed_weight_refuses_what_does_not_fit():
    lin = _linear(16, 8)
    qw = quantize_tensor(lin.weight.detach(), bits=4, symmetric=False)
    packed = PackedWeight.from_quantized(qw, (8, 16))
    kw = {"spec": qw.spec, "granularity": qw.granularity, "weight_shape": (8, 16)}
    data, scale, zp = packed.packed_bytes(), packed.scale, packed.zero_point
    with pytest.raises(ValueError, match=r"'codes' is uint8 \(63,\), expected uint8 \(64,\)"):
        PackedWeight(packed.layout, data[:-1], scale, zp, **kw)
    with pytest.raises(ValueError, match="scale has shape"):
        PackedWeight(packed.layout, data, scale[:4], zp, **kw)
    with pytest.raises(ValueError, match="asymmetric grid needs its zero points"):
        PackedWeight(packed.layout, data, scale, None, **kw)
    with pytest.raises(ValueError, match="do not fit a weight of shape"):
        PackedWeight(packed.layout, data, scale, zp, **{**kw, "weight_shape": (16, 8)})
    with pytest.raises(ValueError, match="3-bit codes, the grid has 4"):
        PackedWeight(grid_layout(GridSpec(3, "narrow"), (8, 16)), data, scale, zp, **kw)
    with pytest.raises(ValueError, match="packed weight has shape"):
        QuantLinear(8, 16, packed=packed)


def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()


def test_code_that_reads_weight_gets_the_dequantized_weight(tmp_path):
    """nn.TransformerEncoderLayer's fast path hands ``linear1.weight`` to a fused kernel: a loaded
    packed model must run there too (it raised AttributeError before)."""
    import specquant as sq
    from specquant.io import load, save

    m = _encoder()
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    sq.quantize(m, sq.RTNConfig(bits=4), calib=x, progress=False)
    loaded = load(save(m, tmp_path / "enc.sq", arch=_encoder), build=_encoder)
    layer = loaded.layers[0].linear1
    assert isinstance(layer, QuantLinear) and torch.equal(layer.weight, layer.dequantized_weight())
    assert torch.equal(layer.weight, m.layers[0].linear1.weight)
    with torch.inference_mode():  # the fused fast path
        assert torch.equal(loaded(x), m(x))
