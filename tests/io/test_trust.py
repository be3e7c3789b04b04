"""Loading an untrusted file: it never runs code it names, never hangs, never lies.

Each test reproduces an attack or a careless input that worked before the trust rules.
"""
import json
import os
import struct
import sys
import textwrap

import pytest
import torch
from torch import nn

from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.engine.apply import quantize
from specquant.io import SQFormatError, load, payload_digest, read_header, save, storage_breakdown

# A module that leaves a mark when it is imported or its builder is called.
BAIT = textwrap.dedent(
    '''
    import os
    from pathlib import Path

    from torch import nn

    Path(os.environ["SQ_BAIT_DIR"], "imported").write_text("x")


    def build():
        Path(os.environ["SQ_BAIT_DIR"], "called").write_text("x")
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


    def other():
        Path(os.environ["SQ_BAIT_DIR"], "other").write_text("x")
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    '''
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


@pytest.fixture
def bait(tmp_path, monkeypatch):
    """An importable module ``sq_bait`` that writes marker files; yields the marker folder."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "sq_bait.py").write_text(BAIT)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("SQ_BAIT_DIR", str(marks))
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("sq_bait", None)
    yield marks
    sys.modules.pop("sq_bait", None)


@pytest.fixture
def bait_file(tmp_path, bait):
    """A quantized model file whose header names the entry point ``sq_bait:build``."""
    m = _net()
    quantize(m, RTNConfig(bits=4), calib=torch.randn(16, 6), progress=False)
    path = save(m, tmp_path / "m.sq", arch="sq_bait:build")
    for f in bait.iterdir():  # saving imported it (the caller's own choice): start clean
        f.unlink()
    sys.modules.pop("sq_bait", None)
    return path, m


def test_a_file_naming_an_entry_point_is_refused_without_importing_it(bait_file, bait):
    path, _ = bait_file
    with pytest.raises(SQFormatError, match=r"entry point 'sq_bait:build'.*allow_entry_point='sq_bait:build'"):
        load(path)
    assert list(bait.iterdir()) == [] and "sq_bait" not in sys.modules  # never imported, never called


def test_the_cli_refuses_it_too(bait_file, bait, capsys):
    from specquant.cli import main

    path, _ = bait_file
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-entry-point sq_bait:build" in err
    assert list(bait.iterdir()) == []


def test_allowing_exactly_that_name_loads_it(bait_file, bait):
    path, m = bait_file
    with pytest.raises(SQFormatError, match="entry point"):
        load(path, allow_entry_point=["sq_bait:other"])  # another name is no permission
    assert list(bait.iterdir()) == []
    loaded = load(path, allow_entry_point="sq_bait:build", kernel="torch")
    assert sorted(f.name for f in bait.iterdir()) == ["called", "imported"]
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), m(x))


def test_a_builder_from_the_caller_needs_no_import(bait_file, bait, tmp_path):
    path, m = bait_file
    loaded = load(path, build=lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), kernel="torch")
    assert list(bait.iterdir()) == []
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), m(x))
    again = save(loaded, tmp_path / "again.sq")  # saving it again reuses the caller's builder
    assert list(bait.iterdir()) == [] and again.read_bytes() == path.read_bytes()


def _rewrite(path, edit, fix_digest=True):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["specquant"])
    tensors = st_load(data)
    edit(header, tensors)
    if fix_digest:
        header["payload_sha256"] = payload_digest(header, tensors)
    path.write_bytes(st_save(tensors, metadata={"specquant": json.dumps(header)}))


@pytest.fixture
def zoo_file(tmp_path):
    from specquant.models import zoo

    m = zoo.get_entry("digits-mlp").build().eval()
    quantize(m, RTNConfig(bits=3), calib=torch.randn(32, 64), progress=False)
    return save(m, tmp_path / "d.sq", model_id="digits-mlp")


@pytest.mark.parametrize("arch", ["os:system", "os:abort", "builtins:exit", "subprocess:Popen", "antigravity:x",
                                  "code:interact", "pdb:set_trace"])
def test_standard_library_entry_points_with_a_recomputed_checksum(zoo_file, arch):
    _rewrite(zoo_file, lambda h, t: h.update(model={"zoo_id": None, "arch": arch}))
    before = set(sys.modules)
    with pytest.raises(SQFormatError, match="allow_entry_point"):
        load(zoo_file)
    assert arch.split(":")[0] in before or arch.split(":")[0] not in sys.modules


@pytest.mark.parametrize("arch", ["os:system; rm", "../evil:x", "a:b:c", "", 5, ["os", "system"], "x" * 300 + ":y"])
def test_malformed_entry_points(zoo_file, arch):
    _rewrite(zoo_file, lambda h, t: h.update(model={"zoo_id": None, "arch": arch}))
    with pytest.raises(SQFormatError, match="entry point|corrupted header"):
        load(zoo_file, allow_entry_point=arch if isinstance(arch, str) else None)


# ---- resources -------------------------------------------------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.sq"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with pytest.raises(SQFormatError, match="not a regular file"):
        load(fifo)
    with pytest.raises(SQFormatError, match="not a regular file"):
        read_header(fifo)


def test_a_folder_and_a_device_are_refused(tmp_path):
    with pytest.raises(SQFormatError, match="is a folder"):
        load(tmp_path)
    with pytest.raises(SQFormatError, match="not a regular file"):
        load("/dev/zero")  # endless: reading it whole would exhaust memory


def test_a_header_that_promises_huge_tensors_is_refused_before_reading(zoo_file, monkeypatch):
    data = zoo_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st = json.loads(data[8:8 + n])
    key = next(k for k in st if k != "__metadata__")
    lo = st[key]["data_offsets"][0]
    st[key] = {"dtype": "F32", "shape": [2**36], "data_offsets": [lo, lo + 4 * 2**36]}
    text = json.dumps(st).encode()
    zoo_file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(SQFormatError, match="truncated|byte ranges"):
        load(zoo_file)


# ---- header values ---------------------------------------------------------------------------


def _layer(h, **kw):
    rec = h["layers"][0]
    rec.update(kw)


BAD_HEADERS = [
    (lambda h, t: _layer(h, bits="4"), "bits"),
    (lambda h, t: _layer(h, bits=True), "bits"),
    (lambda h, t: _layer(h, bits=4.0), "bits"),
    (lambda h, t: _layer(h, bits=2**70), "bits"),
    (lambda h, t: _layer(h, shape=["128", 64]), "shape"),
    (lambda h, t: _layer(h, shape=[128, -64]), "shape"),
    (lambda h, t: _layer(h, shape=None), "shape"),
    (lambda h, t: _layer(h, dtype="int64"), "dtype"),
    (lambda h, t: _layer(h, dtype=["float32"]), "dtype"),
    (lambda h, t: _layer(h, bias="yes"), "bias"),
    (lambda h, t: _layer(h, axis=7), "axis"),
    (lambda h, t: _layer(h, granularity=4), "granularity"),
    (lambda h, t: _layer(h, info=[1, 2]), "info"),
    (lambda h, t: _layer(h, name={"a": 1}), "bad layer record"),
    (lambda h, t: _layer(h, name=""), "bad layer record"),
    (lambda h, t: _layer(h, type=["Linear"]), "unknown type"),
    (lambda h, t: _layer(h, kind=None), "weight kind"),
    (lambda h, t: _layer(h, grid=3), "grid"),
    (lambda h, t: _layer(h, scale_dtype="int8"), "scale"),
    (lambda h, t: _layer(h, zero_point=[]), "zero point"),
    (lambda h, t: _layer(h, packing=7), "packing"),
    (lambda h, t: h.update(layers={"0": 1}), "layers"),
    (lambda h, t: h.update(layers=[1, 2]), "bad layer record"),
    (lambda h, t: h.update(layer_defaults=[]), "layer_defaults"),
    (lambda h, t: h.update(folded_bn="bn"), "folded_bn"),
    (lambda h, t: h.update(folded_bn=[3]), "folded_bn"),
    (lambda h, t: h.update(model="digits-mlp"), "'model'"),
    (lambda h, t: h.update(model={"zoo_id": {"x": 1}, "arch": None}), "zoo id"),
    (lambda h, t: h.update(model={"zoo_id": "no-such-model", "arch": None}), "unknown model"),
    (lambda h, t: h.update(model={"zoo_id": None, "arch": None}), "neither a zoo id"),
    (lambda h, t: h.update(tied={"0.weight": 5}), "tied"),
    (lambda h, t: h.update(tied={"0.bias": "2.bias"}), "tie"),
    (lambda h, t: h.update(meta=[1]), "meta"),
    (lambda h, t: h.update(quantized="yes"), "quantized"),
    (lambda h, t: h.update(version=True), "version"),
    (lambda h, t: h.update(version=1.0), "version"),
    (lambda h, t: h.update(layers=[{**h["layers"][1], "tied_to": "0"}] + h["layers"]), "tied to|tied_to|twice"),
]


@pytest.mark.parametrize("edit,match", BAD_HEADERS)
def test_every_header_value_is_checked(zoo_file, edit, match):
    _rewrite(zoo_file, edit)
    with pytest.raises(SQFormatError, match=match):
        load(zoo_file)


def test_deeply_nested_json_is_a_format_error(zoo_file):
    _rewrite(zoo_file, lambda h, t: h.update(meta={"x": json.loads("[" * 50 + "]" * 50)}))
    load(zoo_file)  # nesting that json handles is fine
    data = zoo_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st = json.loads(data[8:8 + n])
    header = st["__metadata__"]["specquant"]
    st["__metadata__"]["specquant"] = header[:-1] + ',"deep":' + "[" * 100000 + "]" * 100000 + "}"
    text = json.dumps(st).encode()
    zoo_file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(SQFormatError):
        load(zoo_file)


def test_nan_in_a_header_is_refused(zoo_file):
    data = zoo_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st = json.loads(data[8:8 + n])
    st["__metadata__"]["specquant"] = st["__metadata__"]["specquant"].replace('"meta":{', '"meta":{"x":NaN,', 1)
    text = json.dumps(st).encode()
    zoo_file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(SQFormatError, match="specquant header"):
        load(zoo_file)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_invalid_scales_are_refused(zoo_file, value):
    def edit(h, t):
        s = t["fc1.scale"].clone()
        s[3] = value
        t["fc1.scale"] = s
    _rewrite(zoo_file, edit)
    with pytest.raises(SQFormatError, match="invalid scales"):
        load(zoo_file)


@pytest.mark.parametrize("key", ["fc1.bias", "fc3.bias"])
def test_nan_float_tensors_are_refused(zoo_file, key):
    def edit(h, t):
        b = t[key].clone()
        b[0] = float("nan")
        t[key] = b
    _rewrite(zoo_file, edit)
    with pytest.raises(SQFormatError, match="NaN or infinite"):
        load(zoo_file)


def test_storage_breakdown_checks_the_header_too(zoo_file):
    _rewrite(zoo_file, lambda h, t: _layer(h, shape="big"))
    with pytest.raises(SQFormatError, match="shape"):
        storage_breakdown(zoo_file)


# ---- ties ------------------------------------------------------------------------------------


class TiedHead(nn.Module):
    """An embedding shared with the output layer, as in language models."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_a_float_tie_is_stored_once_and_kept(tmp_path):
    m = TiedHead().eval()
    path = save(m, tmp_path / "t.sq", arch=TiedHead)
    header = read_header(path)
    assert header["tied"] == {"head.weight": "emb.weight"}
    loaded = load(path, build=TiedHead, kernel="torch")
    assert loaded.head.weight is loaded.emb.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), m(ids))


def _two_linears():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_a_quantized_tie_is_stored_once_and_kept(tmp_path):
    m = _two_linears().eval()
    m[2].weight = m[0].weight  # one Parameter, two layers (each its own bias)
    quantize(m, GPFQConfig(bits=3), calib=torch.randn(64, 8), progress=False)
    assert m[0].weight is m[2].weight and m[0].qweight is m[2].qweight
    path = save(m, tmp_path / "q.sq", arch=_two_linears)
    recs = {r["name"]: r for r in read_header(path)["layers"]}
    assert recs["2"]["tied_to"] == "0" and "kind" not in recs["2"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "2.codes" not in f.keys() and "0.codes" in f.keys()
    loaded = load(path, build=_two_linears, kernel="torch")
    assert loaded[2].packed is loaded[0].packed  # one packed weight (codes, scales) for both layers
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), m(x))


# ---- whatever quantize changes, save/load round-trips ------------------------------------------


class WithAttention(nn.Module):
    """MultiheadAttention reads out_proj.weight directly (never calls its forward)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):  # x (B, T, 6)
        h = self.inp(x)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.out(a)


@pytest.mark.parametrize("with_data", [False, True])
def test_a_model_with_attention_round_trips(tmp_path, with_data):
    torch.manual_seed(0)
    m = WithAttention().eval()
    x = torch.randn(8, 5, 6)
    report = quantize(m, RTNConfig(bits=4), calib=x if with_data else None, example_input=x, progress=False)
    assert "att.out_proj" in {s.name for s in report.skipped}
    loaded = load(save(m, tmp_path / "a.sq", arch=WithAttention), build=WithAttention, kernel="torch")
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))


def test_non_finite_values_in_layer_info_are_saved_as_strict_json(tmp_path):
    m = _net()
    quantize(m, RTNConfig(bits=4), calib=torch.randn(16, 6), progress=False)
    m[0].qweight.info["probe"] = torch.tensor([float("nan"), float("inf"), 1.0])  # small tensors become lists
    path = save(m, tmp_path / "n.sq", arch=_net)
    loaded = load(path, build=_net, kernel="torch")
    assert read_header(path)["layers"][0]["info"]["probe"] == ["nan", "inf", 1.0]
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), m(x))
