"""The integer W8A8 path (``mode="int8_static"``): the input quantizer's codes × the weight codes,
int32 accumulation, zero points expanded; equal to the fake-quant model within one output step."""
import copy

import pytest
import torch
from torch import nn

from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.engine.apply import quantize
from specquant.nn import QuantConv2d, QuantLinear, convert, set_int8_static


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def data(seed=1):
    return torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _codes_and_outputs(model, x):
    """Each quantized layer's input codes (its own quantizer on its input) and the model output."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    codes = {}
    hs = [m.register_forward_pre_hook(lambda m, a, n=n: codes.__setitem__(n, m.input_quant.codes(a[0]).int()))
          for n, m in layers]
    with torch.no_grad():
        y = model(x)
    for h in hs:
        h.remove()
    return codes, y


@pytest.mark.parametrize("cfg", [RTNConfig(bits=8, act_bits=8), GPFQConfig(bits=8, act_bits=8, symmetric=False),
                                 RTNConfig(bits=8, act_bits=4, act_calibrator="minmax")])
def test_integer_path_equals_fake_quant_within_one_output_step(cfg):
    model, x = net(), data()
    quantize(model, cfg, calib=x, progress=False)
    fake = convert(copy.deepcopy(model), kernel="torch")
    integer = convert(copy.deepcopy(model), kernel="torch")
    assert set_int8_static(integer) == ["0", "2", "5", "7"]
    c_fake, y_fake = _codes_and_outputs(fake, x)
    c_int, y_int = _codes_and_outputs(integer, x)
    for n in c_fake:  # every requantization (the next layer's input codes) within one step
        assert int((c_fake[n] - c_int[n]).abs().max()) <= 1, n
    assert sum(int((c_fake[n] != c_int[n]).sum()) for n in c_fake) <= 0.01 * sum(c.numel() for c in c_fake.values())
    # the last layer: within one step of its input quantizer's grid times its weights' scale, far below it here
    step = float(integer[7].input_quant.scale) * float(integer[7].packed.scale.max()) * 16 * 128
    assert float((y_fake - y_int).abs().max()) <= step


def test_one_layer_is_integer_exact():
    """With one layer the integer bracket is exact, so it matches float64 fake-quant to float rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 7)).eval()
    x = torch.randn(64, 20)
    quantize(model, RTNConfig(bits=8, act_bits=8, symmetric=False), calib=x, progress=False)
    layer = convert(copy.deepcopy(model), kernel="torch")[0]
    w = layer.dequantized_weight().double()
    ref = layer.input_quant.fake_quantize(x.double()) @ w.T + layer.bias.double()
    layer.set_mode("int8_static")
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-6, atol=1e-6)


def test_refusals_are_one_line():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 4)).eval(), torch.randn(8, 6)
    quantize(model, RTNConfig(bits=4, act_bits=8), calib=x, progress=False)
    layer = convert(copy.deepcopy(model), kernel="torch")[0]
    with pytest.raises(ValueError, match="int8_static mode needs 8-bit weights"):
        layer.set_mode("int8_static")
    plain = nn.Sequential(nn.Linear(6, 4)).eval()
    quantize(plain, RTNConfig(bits=8), calib=x, progress=False)
    with pytest.raises(ValueError, match="int8_static mode needs an input quantizer"):
        convert(plain, kernel="torch")[0].set_mode("int8_static")
