"""Activation quantization in the engine (config.act_bits): input quantizers calibrated per layer,
installed before the layer's weight algorithm, carried by the X̃ stream and by the packed model."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import specquant as sq
from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.algorithms import base as algorithms_base
from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, register_method
from specquant.core.quantizer import quantize_tensor
from specquant.engine.apply import quantize
from specquant.io.format import expand_layers, read_header
from specquant.nn import convert


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def data(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass
class SpyConfig(QuantConfig):
    """Min-max RTN that records the statistics each layer's algorithm receives."""

    method = "spy"
    needs_data = True


SEEN: dict[str, LayerStats] = {}


def spy_quantize_weight(W: torch.Tensor, stats: LayerStats | None, config: SpyConfig, ctx: QuantContext):
    """W (out, N0) on a min-max grid; ``stats`` kept for the test."""
    SEEN[ctx.layer] = stats
    return quantize_tensor(W, bits=config.bits, granularity=config.granularity, clipping="minmax")


@pytest.fixture
def spy(monkeypatch):
    monkeypatch.setattr(algorithms_base, "_METHODS", dict(algorithms_base._METHODS))
    SEEN.clear()
    return register_method("spy", SpyConfig, spy_quantize_weight, "min-max RTN recording its statistics")


def test_xt_stream_carries_the_quantized_activations(spy):
    model, x = mlp(), data((256, 6))
    fm = copy.deepcopy(model)
    report = quantize(model, SpyConfig(bits=4, act_bits=4, act_calibrator="minmax"), calib=x, progress=False)
    aqs = {n: model.get_submodule(n).act_quant for n in ("0", "2", "4")}
    assert [r.act for r in report.layers] == [aqs[n].to_record() for n in ("0", "2", "4")]
    # layer 0: X is the float input, X̃ its own quantized input
    torch.testing.assert_close(SEEN["0"].mean_x, x.double().mean(0))
    torch.testing.assert_close(SEEN["0"].mean_xt, aqs["0"].fake_quantize(x).double().mean(0))
    assert not torch.allclose(SEEN["0"].mean_x, SEEN["0"].mean_xt)
    # layer 2: X̃ = Q2(relu(Ŵ0 Q0(x) + b0)) from the quantized model, X from the float model
    with torch.no_grad():
        xt2 = aqs["2"].fake_quantize(torch.relu(model[0](x)))  # model[0]'s hook applies Q0
        x2 = torch.relu(fm[0](x))
    torch.testing.assert_close(SEEN["2"].mean_xt, xt2.double().mean(0))
    torch.testing.assert_close(SEEN["2"].mean_x, x2.double().mean(0))
    torch.testing.assert_close(SEEN["2"].H, xt2.double().T @ xt2.double(), rtol=1e-5, atol=0)  # float32 products
    # minmax on the quantized inputs: the range is exactly [min, max] of X̃ (before Q2), with 0 inside
    with torch.no_grad():
        raw = torch.relu(model[0](x))
    assert aqs["2"].scale == pytest.approx(float(raw.max()) / 15, rel=1e-6) and aqs["2"].zero_point == 0


@pytest.mark.parametrize("cfg", [RTNConfig(bits=4, act_bits=8), GPFQConfig(bits=4, act_bits=4, act_calibrator="kl"),
                                 GPFQConfig(bits=8, act_bits=8, act_calibrator="aciq", act_source="float")])
def test_fake_quant_model_equals_the_packed_model(cfg):
    model, x = convnet(), data((32, 3, 8, 8))
    report = quantize(model, cfg, calib=x, progress=False)
    assert all(r.act is not None and r.act["bits"] == cfg.act_bits for r in report.layers)
    y = model(x)
    packed = convert(copy.deepcopy(model), kernel="torch")
    assert all(packed.get_submodule(r.name).input_quant is not None for r in report.layers)
    assert torch.equal(packed(x), y)


def test_activation_quantization_changes_outputs_and_8_bits_stays_close():
    model, x = convnet(), data((64, 3, 8, 8))
    with torch.no_grad():
        ref = copy.deepcopy(model)(x)
    wq = copy.deepcopy(model)
    quantize(wq, RTNConfig(bits=8), calib=x, progress=False)
    errs = {}
    for a in (8, 4, 2):
        m = copy.deepcopy(model)
        quantize(m, RTNConfig(bits=8, act_bits=a), calib=x, progress=False)
        with torch.no_grad():
            errs[a] = float((m(x) - ref).norm() / ref.norm())
    with torch.no_grad():
        w_only = float((wq(x) - ref).norm() / ref.norm())
    assert w_only < errs[8] < errs[4] < errs[2]
    assert errs[8] < 0.02


def test_act_source_float_and_quantized_differ_after_the_first_layer():
    model, x = mlp(), data((256, 6))
    out = {}
    for src in ("quantized", "float"):
        m = copy.deepcopy(model)
        r = quantize(m, RTNConfig(bits=2, act_bits=4, act_calibrator="minmax", act_source=src), calib=x,
                     progress=False)
        out[src] = [rec.act for rec in r.layers]
    assert out["quantized"][0] == out["float"][0]  # nothing quantized before the first layer
    assert out["quantized"][1:] != out["float"][1:]


def test_config_dict_without_activation_quantization_is_unchanged():
    d = GPFQConfig(bits=4).to_dict()
    assert not {"act_bits", "act_calibrator", "act_source"} & set(d)
    d = GPFQConfig(bits=4, act_bits=8).to_dict()
    assert (d["act_bits"], d["act_calibrator"], d["act_source"]) == (8, "mse", "quantized")
    assert "act" not in quantize(mlp(), RTNConfig(bits=4), calib=data((16, 6)), progress=False).to_dict()["layers"][0]


def test_seeded_and_repeatable():
    model, x = convnet(), data((16, 3, 8, 8))
    acts = []
    for _ in range(2):
        m = copy.deepcopy(model)
        acts.append([r.act for r in quantize(m, RTNConfig(bits=4, act_bits=6), calib=x, progress=False).layers])
    assert acts[0] == acts[1]


@pytest.mark.parametrize("kw,match", [
    ({"act_bits": 9}, "config.act_bits"),
    ({"act_bits": 8, "act_calibrator": "l2"}, "config.act_calibrator: unknown activation calibrator 'l2'"),
    ({"act_bits": 8, "act_source": "both"}, "config.act_source must be one of quantized, float, got 'both'"),
])
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        RTNConfig(bits=4, **kw)


def test_activation_quantization_needs_data():
    assert RTNConfig(bits=4, act_bits=8).needs_data
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(mlp(), RTNConfig(bits=4, act_bits=8), example_input=data((2, 6)), progress=False)


def test_public_api_save_load_round_trip(tmp_path):
    model, x = convnet(), data((32, 3, 8, 8))
    quantize(model, GPFQConfig(bits=4, act_bits=8), calib=x, progress=False)
    sq.save(model, tmp_path / "m.sq", arch=convnet)
    loaded = sq.load(tmp_path / "m.sq", build=convnet, kernel="torch")  # the PyTorch path: bit-identical
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    acts = {r["name"]: r.get("act") for r in expand_layers(read_header(tmp_path / "m.sq"))}
    assert acts == {n: m.act_quant.to_record() for n, m in model.named_modules() if hasattr(m, "act_quant")}
