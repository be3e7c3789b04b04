"""The packed format: exact round trips, honest size, and one clear error for every bad file."""
import copy
import json
import math
import os
import struct
import textwrap

import pytest
import torch
from torch import nn

from specquant.algorithms import GPFQConfig, ModuleSettings, RTNConfig
from specquant.algorithms.frame import FrameConfig
from specquant.core.layouts import BitsLayout, FrameLayout, RowsLayout
from specquant.core.pack import packed_nbytes, trits_nbytes
from specquant.engine.apply import quantize
from specquant.io import SQFormatError, load, payload_digest, read_header, save, storage_breakdown
from specquant.nn import QuantConv2d, QuantLinear, convert

NETS = textwrap.dedent(
    '''
    import torch
    from torch import nn


    def small_mlp():
        return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5))


    def wide_mlp():  # fc1 has more weights than specquant.nn.layers.CHUNK_WEIGHTS: row-chunked path
        return nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 10))


    def small_convnet():
        return nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 6),
        )  # the BatchNorm1d after pooling is not folded: it stays float
    '''
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """An importable module of small architectures (for the 'module:function' entry point)."""
    import importlib
    import sys

    folder = tmp_path_factory.mktemp("nets")
    (folder / "sq_test_nets.py").write_text(NETS)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("sq_test_nets")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("sq_test_nets", None)


TRUSTED = ("sq_test_nets:small_mlp", "sq_test_nets:wide_mlp", "sq_test_nets:small_convnet")


def _load(path, **kw):
    """``load`` trusting the test's own architecture module (its files name those entry points)."""
    kw.setdefault("kernel", "torch")  # the PyTorch path: bit-identical to the fake-quant model
    return load(path, allow_entry_point=TRUSTED, **kw)


def _trained_like(model, seed=0):
    """Random weights and BatchNorm statistics (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _case(nets, which):
    g = torch.Generator().manual_seed(3)
    if which == "mlp":
        torch.manual_seed(0)
        return _trained_like(nets.small_mlp()), "sq_test_nets:small_mlp", torch.randn(64, 24, generator=g)
    torch.manual_seed(0)
    return _trained_like(nets.small_convnet()), "sq_test_nets:small_convnet", torch.randn(16, 4, 8, 8, generator=g)


def _quantized(model, cfg, x):
    m = copy.deepcopy(model)
    quantize(m, cfg, calib=x, progress=False)
    return m


def _qmods(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}


@pytest.mark.parametrize("which", ["mlp", "conv"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "gpfq"])
def test_round_trip_bit_identical(nets, tmp_path, which, bits, method):
    model, arch, x = _case(nets, which)
    cfg = RTNConfig(bits=bits) if method == "rtn" else GPFQConfig(bits=bits)
    fq = _quantized(model, cfg, x)
    path = save(fq, tmp_path / "m.sq", arch=arch, meta={"bits": bits})
    loaded = _load(path)
    qmods = _qmods(fq)
    lmods = dict(loaded.named_modules())
    assert qmods, "the engine quantized nothing"
    for name, mod in qmods.items():
        layer = lmods[name]
        assert isinstance(layer, (QuantLinear, QuantConv2d))
        assert torch.equal(layer.packed.unpack(), mod.qweight.codes)
        assert torch.equal(layer.packed.scale, mod.qweight.scale)
        assert torch.equal(layer.dequantized_weight(), mod.weight)
    with torch.no_grad():
        y_loaded, y_mem = loaded(x), fq(x)
        assert torch.equal(y_loaded, y_mem)
        assert torch.equal(y_loaded, convert(copy.deepcopy(fq), kernel="torch")(x))
        # the default kernel (onnxruntime's MatMulNBits for 4-bit Linear layers, when installed): float rounding
        torch.testing.assert_close(_load(path, kernel="auto")(x), y_mem, rtol=1e-5, atol=1e-6)
    header = read_header(path)
    assert header["model"]["arch"] == arch and header["meta"] == {"bits": bits}
    assert {rec["bits"] for rec in header["layers"]} == {bits}
    if which == "conv":
        assert header["folded_bn"] == ["1", "4"]
        assert isinstance(loaded[1], nn.Identity)
    # saving the loaded model again gives the same bytes
    again = save(loaded, tmp_path / "again.sq")
    assert again.read_bytes() == path.read_bytes()


def _ideal_bytes(fq, scale_bytes=4):
    """Σ ceil(bits·n/8) (3-level grids: ceil(n/5)) + scales (+ zero points) + every tensor that stays float."""
    qm = _qmods(fq)
    codes = sum(trits_nbytes(m.qweight.codes.numel()) if m.qweight.levels == 3 else
                packed_nbytes(m.qweight.codes.numel(), m.qweight.bits) for m in qm.values())
    scales = sum(m.qweight.scale.numel() * scale_bytes for m in qm.values())
    zps = sum(m.qweight.zero_point.numel() for m in qm.values() if not m.qweight.spec.symmetric)
    prefixes = tuple(n + "." for n in qm)
    floats = sum(t.numel() * t.element_size() for k, t in fq.state_dict().items() if not k.startswith(prefixes))
    biases = sum(m.bias.numel() * m.bias.element_size() for m in qm.values() if m.bias is not None)
    return codes + scales + zps + floats + biases


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
def test_file_size_near_ideal(nets, tmp_path, bits, symmetric, scale_dtype):
    model, arch, x = _case(nets, "conv")
    fq = _quantized(model, RTNConfig(bits=bits, symmetric=symmetric), x)
    path = save(fq, tmp_path / "m.sq", arch=arch, scale_dtype=scale_dtype)
    ideal = _ideal_bytes(fq, scale_bytes=4 if scale_dtype == "fp32" else 2)
    size = path.stat().st_size
    assert ideal <= size <= 1.02 * ideal + 16 * 1024
    br = storage_breakdown(path)
    assert br["ideal_bytes"] == ideal and br["file_bytes"] == size
    loaded = _load(path)
    if scale_dtype == "fp16":
        layer = loaded[0]
        assert layer.packed.scale.dtype == torch.float16
        torch.testing.assert_close(loaded(x), fq(x), rtol=2e-3, atol=2e-3)
    else:
        assert torch.equal(loaded(x), fq(x))


@pytest.mark.parametrize("bits", [3, 8])
def test_round_trip_large_layer_equal_outputs(nets, tmp_path, bits):
    from specquant.nn.layers import CHUNK_WEIGHTS

    torch.manual_seed(0)
    model = nets.wide_mlp().eval()
    assert 784 * 400 > CHUNK_WEIGHTS
    x = torch.randn(5, 784)
    fq = _quantized(model, RTNConfig(bits=bits, scale_rule="minmax"), x)
    loaded = _load(save(fq, tmp_path / "w.sq", arch="sq_test_nets:wide_mlp"))
    assert torch.equal(loaded[0].packed.unpack(), fq[0].qweight.codes)
    assert torch.equal(loaded(x), fq(x))
    assert torch.equal(loaded(x[:1]), fq(x[:1]))


def test_float_model_round_trip(nets, tmp_path):
    model, arch, x = _case(nets, "conv")
    path = save(model, tmp_path / "f.sq", arch=arch)
    loaded = _load(path)
    assert read_header(path)["quantized"] is False
    assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in loaded.modules())
    assert torch.equal(loaded(x), model(x))


def test_zoo_id_build_needs_no_training_or_data(tmp_path, monkeypatch):
    from specquant.models import zoo

    model = zoo.get_entry("digits-mlp").build().eval()  # random weights, as good as trained here
    x = torch.randn(32, 64)
    fq = _quantized(model, RTNConfig(bits=4), x)
    path = save(fq, tmp_path / "d.sq", model_id="digits-mlp")

    def refuse(*a, **k):
        raise AssertionError("load must not train or read data")

    monkeypatch.setattr(zoo, "train_mlp", refuse)
    monkeypatch.setattr(zoo._data, "load_digits_split", refuse)
    monkeypatch.setattr(torch, "load", refuse)  # and never unpickle anything
    loaded = _load(path)
    assert torch.equal(loaded(x), fq(x))
    assert read_header(path)["model"] == {"zoo_id": "digits-mlp", "arch": None}


def test_save_needs_an_architecture(nets, tmp_path):
    model, _, _ = _case(nets, "mlp")
    with pytest.raises(ValueError, match="model_id"):
        save(model, tmp_path / "x.sq")


# ---- bad files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conv3(nets):
    model, arch, x = _case(nets, "conv")
    return _quantized(model, RTNConfig(bits=3), x), arch


@pytest.fixture
def saved(conv3, tmp_path):
    fq, arch = conv3
    return save(fq, tmp_path / "m.sq", arch=arch)


def test_round_trip_mixed_row_widths(nets, tmp_path):
    model, arch, x = _case(nets, "conv")
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    widths = tuple(int(b) for b in (torch.arange(conv.out_channels) % 4 + 1))  # 1, 2, 3, 4, 1, …
    fq = _quantized(model, GPFQConfig(bits=3, modules={name: ModuleSettings(row_bits=widths)}), x)
    path = save(fq, tmp_path / "m.sq", arch=arch)
    loaded = _load(path)
    layer, qw = dict(loaded.named_modules())[name], dict(fq.named_modules())[name].qweight
    assert isinstance(layer.packed.layout, RowsLayout) and layer.packed.row_bits.tolist() == list(widths)
    assert layer.packed.layout == qw.layout
    assert torch.equal(layer.packed.unpack(), qw.codes)
    assert torch.equal(layer.dequantized_weight(), dict(fq.named_modules())[name].weight)
    with torch.no_grad():
        assert torch.equal(loaded(x), fq(x))
    rec = next(r for r in read_header(path)["layers"] if r["name"] == name)
    assert rec["packing"] == "rows" and rec["bits"] == 4
    row_len = conv.weight[0].numel()  # each width's rows packed together; 2-bit rows five codes per byte
    expect = sum(trits_nbytes(widths.count(b) * row_len) if b == 2 else packed_nbytes(widths.count(b) * row_len, b)
                 for b in set(widths))
    assert layer.packed.codes.numel() == expect
    assert again_bytes(loaded, tmp_path) == path.read_bytes()


def again_bytes(model, tmp_path):
    return save(model, tmp_path / "again.sq").read_bytes()


def test_ternary_file_written_bit_packed_still_loads(nets, tmp_path):
    # files written before ternary codes were packed five per byte hold them at 2 bits each and
    # have no "packing" field: they must load to the same model
    from specquant.core.pack import pack

    model, arch, x = _case(nets, "conv")
    fq = _quantized(model, RTNConfig(bits=2), x)
    path = save(fq, tmp_path / "m.sq", arch=arch)
    qmods = _qmods(fq)

    def to_bits(h, t):
        h.get("layer_defaults", {}).pop("packing", None)
        for rec in h["layers"]:
            rec.pop("packing", None)
            t[f"{rec['name']}.codes"] = pack(qmods[rec["name"]].qweight.codes.to(torch.uint8), 2)

    _rewrite(path, to_bits)
    loaded = _load(path)
    for name, mod in qmods.items():
        layer = dict(loaded.named_modules())[name]
        assert layer.packed.layout == BitsLayout(2, mod.weight.shape)
        assert torch.equal(layer.packed.unpack(), mod.qweight.codes)
    with torch.no_grad():
        assert torch.equal(loaded(x), fq(x))


def _split(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data, n


def _rewrite(path, edit, fix_digest=True):
    """Rewrite the file with an edited specquant header (and, by default, a matching digest)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    data, n = _split(path)
    meta = json.loads(data[8:8 + n])["__metadata__"]
    header = json.loads(meta["specquant"])
    tensors = st_load(data)
    edit(header, tensors)
    if fix_digest:
        header["payload_sha256"] = payload_digest(header, tensors)
    path.write_bytes(st_save(tensors, metadata={"specquant": json.dumps(header)}))


def test_every_flipped_payload_byte_is_caught(saved):
    data, n = _split(saved)
    start = 8 + n
    step = max(1, (len(data) - start) // 40)
    for pos in list(range(start, len(data), step)) + [len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        saved.write_bytes(bytes(bad))
        with pytest.raises(SQFormatError, match="checksum mismatch|corrupted"):
            _load(saved)


def test_altered_header_is_caught(saved):
    data, n = _split(saved)
    text = data[8:8 + n]
    i = text.index(b'\\"bits\\":3')
    bad = data[:8 + i] + text[i:].replace(b'\\"bits\\":3', b'\\"bits\\":4', 1) + data[8 + n:]
    assert len(bad) == len(data)
    saved.write_bytes(bad)
    with pytest.raises(SQFormatError, match="checksum mismatch"):
        _load(saved)


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -100, -1])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(SQFormatError, match="truncated|not a specquant file"):
        _load(saved)


def test_trailing_bytes(saved):
    saved.write_bytes(saved.read_bytes() + b"\0" * 16)
    with pytest.raises(SQFormatError, match="trailing"):
        _load(saved)


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unknown_version(saved, version):
    _rewrite(saved, lambda h, t: h.update(version=version))
    with pytest.raises(SQFormatError, match=f"unsupported specquant format version {version!r}"):
        _load(saved)


def test_not_a_specquant_file(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    junk = tmp_path / "junk.sq"
    junk.write_bytes(os.urandom(300))
    text = tmp_path / "text.sq"
    text.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    for p in (plain, junk, text):
        with pytest.raises(SQFormatError, match="not a specquant file"):
            _load(p)
    with pytest.raises(SQFormatError, match="no such file"):
        _load(tmp_path / "missing.sq")


def _set_layer(name, **kw):
    def edit(h, t):
        rec = next(r for r in h["layers"] if r["name"] == name)
        rec.update(kw)
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set_layer("0", bits=4, levels=15), "'0.codes'"),
    (_set_layer("0", shape=[8, 4, 3, 5]), "'0.codes'|header and architecture"),
    (_set_layer("0", granularity="tensor"), "'0.scale'"),
    (_set_layer("0", scale_dtype="float16"), "'0.scale'"),
    (_set_layer("0", zero_point="uint8"), "zero_point"),
    (_set_layer("0", bias=False), "'0.bias'"),
    (_set_layer("0", kind="lattice"), "unknown weight kind"),
    (_set_layer("0", levels=99), "levels"),
    (_set_layer("0", packing="zip"), "unknown code packing 'zip'"),
    (_set_layer("0", packing="trits"), "'trits' packing on a 7-level grid"),
    (_set_layer("0", packing="rows"), "'0.row_bits' should be uint8"),
    (lambda h, t: t.update({"0.row_bits": torch.full((8,), 3, dtype=torch.uint8)}), "'0.row_bits' present"),
    (_set_layer("0", type="Linear"), "header and architecture|shape .* is not 2 positive integers"),
    (lambda h, t: t.pop("8.running_mean"), "lacks"),  # a float tensor missing
    (lambda h, t: t.update({"8.weight": torch.zeros(17)}), r"expects float32 \(16,\)"),
    (lambda h, t: t.update({"9.weight": torch.zeros(6, 16)}), "no place"),
    (lambda h, t: t.update({"extra.thing": torch.zeros(2)}), "names no module|no place"),
    # a packed layer's own buffers are built from its checked record, never overwritten by a file tensor
    (lambda h, t: t.update({"0.packed.scale": -t["0.scale"]}), "tensor '0.packed.scale' has no place"),
    (lambda h, t: t.update({"0._wcache": torch.zeros(8, 4, 3, 3)}), "tensor '0._wcache' has no place"),
    (lambda h, t: h.update(folded_bn=["2"]), "folded BatchNorm"),
])
def test_header_tensor_mismatch(saved, edit, match):
    _rewrite(saved, edit)
    with pytest.raises(SQFormatError, match=match):
        _load(saved)


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(nets, tmp_path, monkeypatch):
    model, arch, x = _case(nets, "mlp")
    fq = _quantized(model, RTNConfig(bits=4), x)
    path = save(fq, tmp_path / "m.sq", arch=arch)
    before = path.read_bytes()
    from specquant.io import files as fmt  # the one atomic writer

    def boom(*a, **k):
        raise OSError("disk full")

    for target in ("replace", "fsync"):
        with monkeypatch.context() as mp:
            mp.setattr(fmt.os, target, boom)
            with pytest.raises(OSError, match="disk full"):
                save(_quantized(model, RTNConfig(bits=2), x), path, arch=arch)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sq"]
        assert path.read_bytes() == before
    with monkeypatch.context() as mp:
        mp.setattr(fmt.os, "replace", boom)
        with pytest.raises(OSError):
            save(fq, tmp_path / "new.sq", arch=arch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.sq"]


def test_frame_layers_round_trip(nets, tmp_path):
    model, arch, x = _case(nets, "conv")
    fq = _quantized(model, FrameConfig(bits=2), x)
    path = save(fq, tmp_path / "fr.sq", arch=arch)
    loaded = _load(path)
    header = read_header(path)
    assert {r["kind"] for r in header["layers"]} == {"frame"}
    for name, mod in _qmods(fq).items():
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.packed.unpack(), mod.qweight.codes)
        assert isinstance(layer.packed.layout, FrameLayout) and layer.packed.layout == mod.qweight.layout
        rec = next(r for r in header["layers"] if r["name"] == name)
        assert rec["frame"]["size"] == mod.qweight.frame_size
        assert layer.packed.codes.numel() == packed_nbytes(math.prod(mod.qweight.codes.shape), 2)
    assert torch.equal(loaded(x), fq(x))


def test_int8_dynamic_load(nets, tmp_path):
    model, arch, x = _case(nets, "mlp")
    fq = _quantized(model, RTNConfig(bits=8), x)
    path = save(fq, tmp_path / "m8.sq", arch=arch)
    loaded = _load(path, int8_dynamic=True)
    assert all(m.mode == "int8_dynamic" for m in loaded.modules() if isinstance(m, QuantLinear))
    y, ref = loaded(x), fq(x)
    assert (y - ref).norm() / ref.norm() < 0.02
