"""Grouped layers through save and load: a shorter last group, activation order with static groups,
float16 scales, and bits per weight that are the file's own bytes."""
import json
import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from specquant.algorithms import GPTQConfig, RTNConfig, make_config
from specquant.engine.apply import quantize
from specquant.io import SQFormatError, load, payload_digest, read_header, save, storage_breakdown

N0 = 576  # 576 = 4·128 + 64 = 9·64; the second layer's 40 inputs make one short group at either size


pytestmark = pytest.mark.usefixtures("one_thread")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N0, 40), nn.ReLU(), nn.Linear(40, 12)).eval()


def _calib(n=96):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(N0, N0, generator=g) / N0**0.5
    return (torch.randn(n, N0, generator=g) @ A) * torch.exp(torch.randn(N0, generator=g))  # uneven inputs


def _quantized(cfg, build=_net):
    model = build()
    x = _calib()
    report = quantize(model, cfg, calib=x, progress=False)
    return model, report, x[:8]


def _layer_file_bits(tensors: dict, name: str) -> int:
    """Bits a layer's own tensors take in the file (codes, scales, zero points)."""
    return sum(8 * t.numel() * t.element_size() for k, t in tensors.items()
               if k in (f"{name}.codes", f"{name}.scale", f"{name}.zero_point"))


CASES = [(m, G, sym, sdt) for m in ("rtn", "gpfq", "spfq", "gptq") for G in (128, 64) for sym in (True, False)
         for sdt in (("float32", "float16") if G == 128 else ("float32",))]


@pytest.mark.parametrize("method,G,symmetric,scale_dtype", CASES)
def test_groups_round_trip_with_identical_outputs(tmp_path, method, G, symmetric, scale_dtype):
    cfg = make_config(method, bits=4, granularity=f"group:{G}", symmetric=symmetric, scale_dtype=scale_dtype)
    fq, report, x = _quantized(cfg)
    path = save(fq, tmp_path / "g.sq", arch=_net)
    loaded = load(path, build=_net, kernel="torch")
    with torch.no_grad():
        assert torch.equal(loaded(x), fq(x))  # float16 scales too: the codes were chosen for them
    header = read_header(path)
    tensors = load_file(str(path))
    assert header["scale_dtype"] == scale_dtype
    for rec, lrec in zip(header["layers"], report.layers):
        name, n_in = rec["name"], rec["shape"][1]
        assert rec["granularity"] == f"group:{G}" and rec["scale_dtype"] == scale_dtype
        assert rec["zero_point"] == ("implicit" if symmetric else "uint8")
        assert tuple(tensors[f"{name}.scale"].shape) == (rec["shape"][0], math.ceil(n_in / G), 1)
        qw = fq.get_submodule(name).qweight
        assert torch.equal(loaded.get_submodule(name).packed.unpack(), qw.codes)
        # bits per weight as reported = the layer's bytes in the file (up to the last code byte's padding)
        assert 0 <= _layer_file_bits(tensors, name) - qw.storage_bits() < 8
        assert lrec.bits_per_weight == qw.bits_per_weight()


def test_act_order_groups_need_no_permutation(tmp_path):
    """GPTQ with act_order and groups (static groups) writes the plain group record: no field a
    per-channel layer lacks, scales in the original column order; a loaded model saves to the same bytes."""
    fq, _, x = _quantized(GPTQConfig(bits=3, granularity="group:128", act_order=True, symmetric=False))
    assert fq[0].qweight.info["act_order"] is True
    path = save(fq, tmp_path / "ao.sq", arch=_net)
    per_channel = save(_quantized(GPTQConfig(bits=3, act_order=True, symmetric=False))[0], tmp_path / "ch.sq",
                       arch=_net)
    fields = {k for r in read_header(path)["layers"] for k in r}
    assert fields == {k for r in read_header(per_channel)["layers"] for k in r} - {"axis"}  # axis: channels only
    loaded = load(path, build=_net, kernel="torch")
    with torch.no_grad():
        assert torch.equal(loaded(x), fq(x))
    again = save(loaded, tmp_path / "again.sq", arch=_net)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("symmetric,scale_dtype,expected,convention", [
    (True, "float32", 4 + 32 / 128, 4 + 16 / 128),
    (True, "float16", 4 + 16 / 128, 4 + 16 / 128),  # 4.125
    (False, "float32", 4 + (32 + 8) / 128, 4 + 32 / 128),
    (False, "float16", 4 + (16 + 8) / 128, 4 + 32 / 128),  # uint8 zero points: 4.1875; fp16 ones would be 4.25
])
def test_bits_per_weight_is_what_the_file_stores(tmp_path, symmetric, scale_dtype, expected, convention):
    """4-bit, groups of 128 on 512 inputs: the reported figure is the file's codes + scales + zero points,
    byte for byte; ``bits_per_weight(16, 16)`` gives the fp16-scale-and-zero-point convention."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(512, 32, bias=False))

    model = build()
    report = quantize(model, RTNConfig(bits=4, granularity="group:128", symmetric=symmetric, scale_dtype=scale_dtype),
                      progress=False)
    qw = model[0].qweight
    assert qw.bits_per_weight() == expected == report.bits_per_weight
    assert qw.bits_per_weight(16, 16) == convention
    path = save(model, tmp_path / "b.sq", arch=build)
    br = storage_breakdown(path)
    stored = 8 * (br["codes_bytes"] + br["scale_bytes"] + br["zero_point_bytes"]) / br["quantized_weights"]
    assert stored == expected
    assert br["scale_bytes"] == 32 * 4 * (2 if scale_dtype == "float16" else 4)
    assert br["zero_point_bytes"] == (0 if symmetric else 32 * 4)
    assert 8 * br["codes_bytes"] / br["quantized_weights"] == 4


def test_save_can_still_round_float32_scales(tmp_path):
    """save(scale_dtype="fp16") on a model quantized with float32 scales rounds them (as in format
    version 1): the file is smaller, the loaded model close to, not equal to, the quantized one."""
    fq, _, x = _quantized(RTNConfig(bits=4, granularity="group:128", symmetric=False))
    loaded = load(save(fq, tmp_path / "r.sq", arch=_net, scale_dtype="fp16"), build=_net, kernel="torch")
    assert loaded[0].packed.scale.dtype == torch.float16
    with torch.no_grad():
        y, ref = loaded(x), fq(x)
    assert not torch.equal(y, ref) and torch.allclose(y, ref, rtol=2e-3, atol=2e-3)


def test_layers_with_different_scale_dtypes(tmp_path):
    """save() keeps each layer's own scale dtype; the header then says "mixed"."""
    fq16, _, x = _quantized(RTNConfig(bits=4, granularity="group:128", scale_dtype="float16"))
    fq32, _, _ = _quantized(RTNConfig(bits=4, granularity="group:128"))
    with torch.no_grad():
        fq16[2].weight.copy_(fq32[2].weight)
    fq16[2].qweight = fq32[2].qweight
    path = save(fq16, tmp_path / "mixed.sq", arch=_net)
    header = read_header(path)
    assert header["scale_dtype"] == "mixed"
    assert [r["scale_dtype"] for r in header["layers"]] == ["float16", "float32"]
    with torch.no_grad():
        assert torch.equal(load(path, build=_net, kernel="torch")(x), fq16(x))


@pytest.fixture(scope="module")
def saved_groups(tmp_path_factory):
    fq, _, _ = _quantized(RTNConfig(bits=4, granularity="group:128", symmetric=False))
    return save(fq, tmp_path_factory.mktemp("g") / "base.sq", arch=_net).read_bytes()


def _rewrite(data: bytes, edit) -> bytes:
    """The file with an edited header and tensors, and a matching checksum (an attacker's file)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["specquant"])
    tensors = st_load(data)
    edit(header, tensors)
    header["payload_sha256"] = payload_digest(header, tensors)
    return st_save(tensors, metadata={"specquant": json.dumps(header)})


def _set(name, **kw):
    def edit(h, t):
        rec = next(r for r in h["layers"] if r["name"] == name)
        rec.update(kw)
    return edit


def test_a_group_larger_than_the_row_is_the_row(tmp_path, saved_groups):
    """group:10^12 with one scale per row loads and runs as per-row scales (nothing is padded to G)."""
    def edit(h, t):
        next(r for r in h["layers"] if r["name"] == "0")["granularity"] = "group:1000000000000"
        for key in ("0.scale", "0.zero_point"):
            t[key] = t[key][:, :1].contiguous()

    path = tmp_path / "huge.sq"
    path.write_bytes(_rewrite(saved_groups, edit))
    loaded = load(path, build=_net, kernel="torch")
    w = loaded[0].packed.dequantize()  # (40, 576)
    codes = loaded[0].packed.unpack().float()
    assert torch.equal(w, (codes - loaded[0].packed.zero_point[:, 0]) * loaded[0].packed.scale[:, 0].float())
    with torch.no_grad():
        assert torch.isfinite(loaded(_calib(4))).all()


def _cut(key):
    def edit(h, t):
        t[key] = t[key][:, :4].contiguous()  # the short last group dropped
    return edit


@pytest.mark.parametrize("edit,match", [
    (_cut("0.scale"), r"'0.scale' should be float32 \(40, 5, 1\)"),  # floor(576/128) groups, not ceil
    (_cut("0.zero_point"), r"'0.zero_point' should be uint8 \(40, 5, 1\)"),
    (_set("0", granularity="group:100"), r"'0.scale' should be float32 \(40, 6, 1\)"),
    (_set("0", granularity="group:1000"), r"'0.scale' should be float32 \(40, 1, 1\)"),
    (_set("0", granularity="group:0"), "group size must be a positive integer"),
    (_set("0", granularity="group:-64"), "group size must be a positive integer"),
    (_set("0", granularity="group:1.5"), "bad group granularity"),
    (_set("0", granularity="group:" + "9" * 5000), "bad group granularity"),
    (_set("0", granularity="group:" + "9" * 4000), r"group size must be a positive integer up to 2\^40"),
    (_set("0", granularity=f"group:{2**40 + 1}"), r"group size must be a positive integer up to 2\^40"),
    (_set("0", granularity=["group", 128]), "bad granularity or axis"),
    (lambda h, t: h.update(scale_dtype="bfloat16"), "'scale_dtype' 'bfloat16' is not float32, float16 or mixed"),
    (lambda h, t: h.update(scale_dtype=16), "'scale_dtype' '16' is not"),
])
def test_bad_group_records_are_one_clear_line(tmp_path, saved_groups, edit, match):
    path = tmp_path / "bad.sq"
    path.write_bytes(_rewrite(saved_groups, edit))
    with pytest.raises(SQFormatError, match=match) as e:
        load(path, build=_net)
    assert "\n" not in str(e.value)
