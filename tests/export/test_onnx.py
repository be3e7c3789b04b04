"""ONNX export: MatMulNBits nodes hold exactly specquant's codes and scales, onnxruntime matches the
fake-quant model, convolutions stay float (and are reported), refusals are one line naming the layer."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import specquant as sq
from specquant.core.nbits import NBitsWeight
from specquant.export import export_onnx
from specquant.nn import convert

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _quantized(model, x, **cfg):
    sq.quantize(model, sq.RTNConfig(**cfg), calib=x, progress=False)
    return model


def _matmulnbits_nodes(path):
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            out[n.name.split("/")[0]] = (attrs, [inits[i] for i in n.input[1:]])
    return m, out


def _decode(attrs, tensors, zp_kind) -> tuple:
    B, scales = torch.from_numpy(tensors[0].copy()), torch.from_numpy(tensors[1].copy())
    zp = torch.from_numpy(tensors[2].copy()) if len(tensors) > 2 else None
    nw = NBitsWeight(B=B, scales=scales, zero_points=zp, K=attrs["K"], N=attrs["N"], bits=attrs["bits"],
                     block_size=attrs["block_size"], zero_point_kind=zp_kind, blocks_per_group=1)
    return nw.decode()


@pytest.mark.parametrize("bits,gran,symmetric", [(4, "group:32", True), (4, "group:16", False), (8, "channel", True),
                                                 (2, "group:32", False), (4, "group:48", True)])
def test_mlp_round_trip_and_outputs(ort, tmp_path, bits, gran, symmetric):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    fq = _quantized(_mlp(), x, bits=bits, granularity=gran, symmetric=symmetric)
    rep = export_onnx(fq, tmp_path / "mlp.onnx", x[:4])
    assert rep.file.stat().st_size == rep.bytes and rep.format == "onnx" and rep.type == "classifier"
    proto, nodes = _matmulnbits_nodes(rep.file)
    assert not [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]  # every Linear became MatMulNBits
    assert set(nodes) == {"0", "2", "4"}
    for rec in rep.layers:
        mod = fq.get_submodule(rec.name)
        qw = mod.qweight
        attrs, tensors = nodes[rec.name]
        assert attrs["bits"] == bits and attrs["accuracy_level"] == 0
        codes, scales, zp = _decode(attrs, tensors, rec.zero_points)
        assert torch.equal(codes, qw.codes)  # the very codes
        K, bs = qw.shape[1], attrs["block_size"]
        for got, want in ((scales, qw.scale), (zp, qw.zero_point)):  # the very scales and zero points
            assert torch.equal(got.repeat_interleave(bs, dim=1)[:, :K], qw.granularity.per_entry(want, qw.shape))
    # onnxruntime vs the fake-quant model on fresh inputs (float32 rounding of three layers' sums)
    sess = ort.InferenceSession(str(rep.file), providers=["CPUExecutionProvider"])
    x2 = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = fq(x2).numpy()
    got = sess.run(None, {"input": x2.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert rep.max_abs_diff is not None and rep.max_abs_diff <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    # the file is its tensors plus a small graph
    assert rep.quantized_bytes == sum(r.nbytes for r in rep.layers)
    assert rep.tensor_bytes < rep.bytes < rep.tensor_bytes + 8192


def test_packed_model_exports_the_same_file_contents(ort, tmp_path):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fq = _quantized(_mlp(), x, bits=4, granularity="group:32")
    a = export_onnx(fq, tmp_path / "a.onnx", x[:2])
    packed = convert(copy.deepcopy(fq))
    b = export_onnx(packed, tmp_path / "b.onnx", x[:2])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.layers == b.layers
    # each is checked against the model it was given (the packed one may run onnxruntime's kernel itself)
    scale = float(fq(x[:2]).detach().abs().max())
    assert a.max_abs_diff <= 1e-5 * scale and b.max_abs_diff <= 1e-5 * scale
    assert any(type(m).__name__ == "QuantLinear" for m in packed.modules())  # the packed model is untouched


def test_convolutions_stay_float_and_are_reported(ort, tmp_path):
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fq = _quantized(_convnet(), x, bits=4, granularity="channel")
    rep = export_onnx(fq, tmp_path / "cnn.onnx", x[:2])
    ops = {r.name: r.op for r in rep.layers}
    assert ops == {"0": "Conv (float)", "2": "Conv (float)", "6": "MatMulNBits", "8": "MatMulNBits"}
    assert any("2 quantized convolution(s) kept as float Conv" in n for n in rep.notes)
    proto, nodes = _matmulnbits_nodes(rep.file)
    from onnx import numpy_helper
    conv_w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("0", "2"):  # the Conv weights are the dequantized codes, bit for bit
        w = fq.get_submodule(name).qweight.dequantize().numpy()
        assert any(a.shape == w.shape and np.array_equal(a, w) for a in conv_w.values())
    assert rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4


def test_tiny_llama_logits_match(ort, tmp_path):
    lm = _tiny_llama()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    _quantized(lm, ids, bits=4, granularity="group:32")
    rep = export_onnx(lm, tmp_path / "lm.onnx", ids[:1])
    assert rep.type == "lm" and rep.inputs == ("input_ids",) and rep.outputs == ("logits",)
    _, nodes = _matmulnbits_nodes(rep.file)
    assert len(nodes) == len(rep.layers) == 2 * 7 + 1  # q, k, v, o, gate, up, down per block, and lm_head
    sess = ort.InferenceSession(str(rep.file), providers=["CPUExecutionProvider"])
    for b, t in ((1, 1), (2, 5), (3, 24)):  # batch and sequence axes are dynamic
        x = torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ref = lm(input_ids=x, use_cache=False).logits.numpy()
        got = sess.run(None, {"input_ids": x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("cfg,pattern", [
    ({"bits": 3, "granularity": "group:32"}, r"^layer '0': its codes are 3-bit; onnxruntime's MatMulNBits runs"),
    ({"bits": 4, "granularity": "group:24"}, r"^layer '0': group size 24 is not a multiple of 16"),
    ({"bits": 4, "granularity": "group:8"}, r"^layer '0': group size 8 is not a multiple of 16"),
])
def test_refusals_name_the_layer_and_write_nothing(tmp_path, cfg, pattern):
    pytest.importorskip("onnx", reason="onnx is not installed")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fq = _quantized(_mlp(), x, **cfg)
    with pytest.raises(ValueError, match=pattern) as e:
        export_onnx(fq, tmp_path / "x.onnx", x[:2])
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_a_changed_weight_is_refused(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fq = _quantized(_mlp(), x, bits=4, granularity="group:32")
    with torch.no_grad():
        fq[2].weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"^layer '2': its weight is not its dequantized quantized weight"):
        export_onnx(fq, tmp_path / "x.onnx", x[:2])
    assert not (tmp_path / "x.onnx").exists()


def test_bad_example_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="example must be a torch.Tensor"):
        export_onnx(_mlp(), tmp_path / "x.onnx", [1, 2])


def test_public_api_and_report_dict(ort, tmp_path):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    fq = _quantized(_mlp(), x, bits=4, granularity="group:64")
    rep = sq.export_onnx(fq, tmp_path / "m.onnx", x[:1])
    d = rep.to_dict()
    assert d["file"] == str(tmp_path / "m.onnx") and d["format"] == "onnx" and d["bytes"] == rep.bytes
    assert d["tensor_bytes"] == rep.quantized_bytes + rep.float_bytes
    assert [layer["op"] for layer in d["layers"]] == ["MatMulNBits"] * 3
