"""Input quantizers in the packed file: recorded per layer ("act"), checked on load, round-tripped."""
import copy
import json
import struct

import pytest
import torch
from torch import nn

from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.engine.apply import quantize
from specquant.io.format import SQFormatError, expand_layers, load, payload_digest, read_header, save


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


@pytest.fixture
def saved(tmp_path):
    model = net()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    quantize(model, GPFQConfig(bits=4, act_bits=6, act_calibrator="percentile"), calib=x, progress=False)
    path = save(model, tmp_path / "m.sq", arch=net)
    return model, x, path


def test_round_trip_is_bit_identical_and_records_every_layer(saved):
    model, x, path = saved
    loaded = load(path, build=net, kernel="torch")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    recs = {r["name"]: r["act"] for r in expand_layers(read_header(path))}
    assert recs == {"0": model[0].act_quant.to_record(), "3": model[3].act_quant.to_record()}
    assert loaded[0].input_quant == model[0].act_quant and loaded[3].input_quant.bits == 6
    again = save(loaded, path.with_name("again.sq"), arch=net)  # a loaded model saves the same records
    assert expand_layers(read_header(again)) == expand_layers(read_header(path))


def test_files_without_activation_quantization_have_no_act_field(tmp_path):
    model = net()
    quantize(model, RTNConfig(bits=4), calib=torch.randn(4, 3, 6, 6), progress=False)
    path = save(model, tmp_path / "w.sq", arch=net)
    assert all("act" not in r for r in expand_layers(read_header(path)))
    assert load(path, build=net)[0].input_quant is None


def _rewrite(path, edit):
    """Rewrite the file with an edited header and a matching digest (as an attacker could)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["specquant"])
    tensors = st_load(data)
    edit(header)
    header["payload_sha256"] = payload_digest(header, tensors)
    path.write_bytes(st_save(tensors, metadata={"specquant": json.dumps(header)}))


def _set_act(**kw):
    def edit(h):
        for r in h["layers"]:
            if r["name"] == "3":
                r["act"] = {**(r.get("act") or h["layer_defaults"]["act"]), **kw}
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set_act(bits=12), "layer '3': activation bits"),
    (_set_act(scale=-0.5), "layer '3': activation scale must be a finite float32 value > 0"),
    (_set_act(scale=3.5e38), "layer '3': activation scale must be a finite float32 value"),  # beyond float32
    (_set_act(scale=float("inf")), "corrupted specquant header"),  # not strict JSON
    (_set_act(zero_point=64), r"layer '3': activation zero point must be an integer in 0..63"),
    (_set_act(calibrator="os.system"), "layer '3': activation calibrator 'os.system'"),
    (_set_act(extra=1), "layer '3': activation record must have bits, scale, zero_point, calibrator"),
])
def test_bad_act_records_are_refused_with_one_line(saved, edit, match):
    _, _, path = saved
    _rewrite(path, edit)
    with pytest.raises(SQFormatError, match=match) as e:
        load(path, build=net)
    assert "\n" not in str(e.value)


def test_tied_layers_keep_their_own_input_quantizer(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Tied().eval(), torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    quantize(model, RTNConfig(bits=4, act_bits=8), calib=x, progress=False)
    path = save(model, tmp_path / "t.sq", arch=Tied)
    loaded = load(path, build=Tied, kernel="torch")
    with torch.no_grad():
        assert torch.equal(loaded(x), copy.deepcopy(model)(x))
    assert loaded.a.input_quant == model.a.act_quant


@pytest.mark.parametrize("grid", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_weights_and_activations_round_trip(tmp_path, grid):
    from specquant.nn import convert

    model = net()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    quantize(model, GPFQConfig(bits=8, grid=grid, act_bits=8, act_grid=grid), calib=x, progress=False)
    path = save(model, tmp_path / "m.sq", arch=net)
    loaded = load(path, build=net, kernel="torch")
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
        assert torch.equal(convert(copy.deepcopy(model))(x), ref)
    recs = {r["name"]: r for r in expand_layers(read_header(path))}
    assert {r["grid"] for r in recs.values()} == {grid} and {r["packing"] for r in recs.values()} == {"fp8"}
    assert {r["act"]["grid"] for r in recs.values()} == {grid}
    assert loaded[0].packed.codes.numel() == 8 * 3 * 3 * 3  # one byte per weight
    assert loaded[0].input_quant == model[0].act_quant


# --------------------------------------------------------------------------- per-token input quantizers


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5)).eval()


@pytest.fixture
def saved_token(tmp_path):
    model = mlp()
    x = torch.randn(4, 7, 12, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 10, 12)  # (B, T, C)
    quantize(model, GPFQConfig(bits=4, act_bits=8, act_granularity="token"), calib=x, progress=False)
    path = save(model, tmp_path / "k.sq", arch=mlp)
    return model, x, path


def test_per_token_packed_equals_fake_quant_and_round_trips(saved_token):
    from specquant.core.actquant import TokenActQuantizer
    from specquant.nn import convert

    model, x, path = saved_token
    assert model[0].act_quant == TokenActQuantizer(8) and model[2].act_quant == TokenActQuantizer(8)
    packed = convert(copy.deepcopy(model), kernel="torch")
    loaded = load(path, build=mlp, kernel="torch")
    with torch.no_grad():
        y = model(x)
        assert torch.equal(packed(x), y) and torch.equal(loaded(x), y)
    assert isinstance(loaded[0].input_quant, TokenActQuantizer) and loaded[2].input_quant.bits == 8
    again = save(loaded, path.with_name("again.sq"), arch=mlp)
    assert expand_layers(read_header(again)) == expand_layers(read_header(path))
    assert {r["name"]: r["act"] for r in expand_layers(read_header(path))} == \
        {"0": {"bits": 8, "granularity": "token"}, "2": {"bits": 8, "granularity": "token"}}


def test_per_token_layers_refuse_the_static_integer_mode(saved_token):
    from specquant.nn.layers import set_int8_static

    model, _, path = saved_token
    loaded = load(path, build=mlp, kernel="torch")
    assert set_int8_static(loaded) == []
    with pytest.raises(ValueError, match="int8_static mode needs a static per-tensor input quantizer") as e:
        loaded[0].set_mode("int8_static")
    assert "\n" not in str(e.value)


def _set_token_act(**kw):
    def edit(h):
        for r in h["layers"]:
            if r["name"] == "2":
                r["act"] = {**(r.get("act") or h["layer_defaults"]["act"]), **kw}
    return edit


@pytest.mark.parametrize("edit,match", [
    (_set_token_act(granularity="channel"), "layer '2': activation granularity 'channel' is not 'token'"),
    (_set_token_act(bits=0), "layer '2': activation bits"),
    (_set_token_act(scale=0.5), "layer '2': per-token activation record must have bits, granularity"),
])
def test_bad_per_token_records_are_refused_with_one_line(saved_token, edit, match):
    _, _, path = saved_token
    _rewrite(path, edit)
    with pytest.raises(SQFormatError, match=match) as e:
        load(path, build=mlp)
    assert "\n" not in str(e.value)
