"""Packed layers: same outputs as the fake-quant model, packed memory, the int8 path = core int matmul."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.core.intmatmul import int_linear, int_matmul, quantize_activations_dynamic
from specquant.core.pack import grid_nbytes, pack, packed_nbytes, unpack
from specquant.core.quantizer import quantize_tensor
from specquant.engine.apply import quantize
from specquant.nn import QuantConv1d, QuantConv2d, QuantLinear, convert, memory_bytes, unpack_codes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP waits make small ops 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
def test_fast_unpack_equals_core(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        data = pack(codes, bits)
        assert torch.equal(unpack_codes(data, bits, n), unpack(data, bits, n))
        assert torch.equal(unpack_codes(data, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("tensor", True), ("group:8", True),
                                                   ("channel", False)])
def test_linear_equals_dequantized(bits, granularity, symmetric):
    lin = _linear(40, 12)
    qw = quantize_tensor(lin.weight.detach(), bits=bits, granularity=granularity, symmetric=symmetric,
                         clipping="minmax")
    ql = QuantLinear.from_quantized(lin, qw)
    w_ref = qw.dequantize()
    assert torch.equal(ql.dequantized_weight(), w_ref)
    assert torch.equal(ql.unpacked_codes(), qw.codes)
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
    packed = grid_nbytes(96 * 64, qw.levels, bits)  # 3-level codes five per byte, else bits each
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


@pytest.mark.parametrize("bits,granularity", [(3, "channel"), (4, "group:9"), (8, "tensor"), (5, "channel")])
def test_chunked_large_linear(bits, granularity):
    # 520·513 weights > CHUNK_WEIGHTS: dequantized in row chunks; odd K makes rows straddle bytes
    lin = _linear(513, 520)
    qw = quantize_tensor(lin.weight.detach(), bits=bits, granularity=granularity, symmetric=bits != 3,
                         clipping="minmax")
    ql = QuantLinear.from_quantized(lin, qw)
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
        packed = convert(copy.deepcopy(fq))
        mods = dict(packed.named_modules())
        for n in qnames:
            assert isinstance(mods[n], (QuantLinear, QuantConv2d))
            assert torch.equal(mods[n].unpacked_codes(), dict(fq.named_modules())[n].qweight.codes)
        with torch.no_grad():
            assert torch.equal(packed(x), fq(x))
        n_weights = sum(math.prod(mods[n].weight_shape) for n in qnames)
        codes_bytes = sum(mods[n].codes.numel() for n in qnames)
        assert codes_bytes == sum(grid_nbytes(math.prod(mods[n].weight_shape), mods[n].spec.levels, bits)
                                  for n in qnames)
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
    frame = pytest.importorskip("specquant.algorithms.frame")
    model = _set_bn_stats(_small_convnet())
    model[3] = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # frame weights: groups=1 only
    x = torch.randn(8, 4, 8, 8)
    fq = _engine_quantized(model, frame.FrameConfig(bits=3), x)
    packed = convert(copy.deepcopy(fq))
    layer = packed[0]
    assert layer.kind == "frame" and layer.int8_eligible() is not None
    assert torch.equal(layer.unpacked_codes(), fq[0].qweight.codes)
    assert memory_bytes(layer) < memory_bytes(fq[0])
    with torch.no_grad():
        assert torch.equal(packed(x), fq(x))
