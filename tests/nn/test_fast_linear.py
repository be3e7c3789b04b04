"""QuantLinear's onnxruntime kernel: chosen automatically, equal to the PyTorch fallback, threads."""
import copy
import pickle

import pytest
import torch
from torch import nn

from specquant.core.quantizer import quantize_tensor
from specquant.nn import QuantLinear, convert, ort_kernel

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(n_in=96, n_out=40, bits=4, gran="group:32", symmetric=True, seed=0, **kw) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    qw = quantize_tensor(lin.weight.detach(), bits=bits, granularity=gran, symmetric=symmetric)
    return QuantLinear.from_quantized(lin, qw, **kw)


def _close_to_fallback(layer: QuantLinear, x: torch.Tensor) -> None:
    """The kernel's output equals the PyTorch path's within float32 rounding of the sums."""
    with torch.no_grad():
        y = layer(x)
        fast = layer.kernel
        layer.set_kernel("torch")
        ref = layer(x)
        layer.set_kernel(fast)
    w = layer.dequantized_weight()
    bound = layer.in_features * torch.finfo(torch.float32).eps * (x.abs().reshape(-1, layer.in_features) @ w.abs().T)
    assert y.shape == ref.shape
    assert bool(((y - ref).reshape(bound.shape).abs() <= bound + 1e-6).all())


@pytest.mark.parametrize("gran,symmetric,n_in", [("group:32", True, 96), ("group:32", False, 100),
                                                  ("channel", True, 70), ("tensor", False, 64),
                                                  ("group:48", True, 144)])
def test_fast_path_is_chosen_and_equals_fallback(ort, gran, symmetric, n_in):
    layer = _layer(n_in=n_in, gran=gran, symmetric=symmetric)
    x = torch.randn(2, 7, n_in, generator=torch.Generator().manual_seed(1))
    assert layer.kernel_reason(x) is None  # auto takes onnxruntime's kernel here
    _close_to_fallback(layer, x)
    layer.set_kernel("onnxruntime")  # required: runs
    _close_to_fallback(layer, x)


@pytest.mark.parametrize("why,setup,pattern", [
    ("autograd", lambda layer, x: (layer, x.requires_grad_()), "autograd"),
    ("dtype", lambda layer, x: (layer, x.double()), "float64"),
    ("bits", lambda layer, x: (_layer(bits=8), x), "8-bit codes run slower"),
    ("3 bits", lambda layer, x: (_layer(bits=3), x), "3-bit; onnxruntime's MatMulNBits runs"),
    ("group", lambda layer, x: (_layer(gran="group:24"), x), "group size 24 is not a multiple of 16"),
    ("int8", lambda layer, x: (_layer(bits=8, gran="channel", mode="int8_dynamic"), x), "int8_dynamic mode"),
    ("torch", lambda layer, x: (_layer(kernel="torch"), x), "kernel='torch'"),
    ("cache", lambda layer, x: (_layer(cache_dequantized=True), x), "cache_dequantized"),
])
def test_fallback_is_chosen_with_the_reason(ort, why, setup, pattern):
    layer, x = setup(_layer(), torch.randn(3, 96))
    reason = layer.kernel_reason(x)
    assert reason is not None and pattern in reason, reason
    y = layer(x)  # runs on the PyTorch path
    if layer.mode == "weight_only":
        ref = torch.nn.functional.linear(x, layer.dequantized_weight().to(x.dtype), layer.bias.to(x.dtype))
        assert torch.equal(y, ref)


def test_required_kernel_refuses_in_one_line(ort):
    layer = _layer(bits=3, kernel="onnxruntime")
    with pytest.raises(ValueError, match=r"^kernel='onnxruntime' cannot run: its codes are 3-bit; [^\n]*$"):
        layer(torch.randn(2, 96))
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        _layer(kernel="fast")


def test_without_onnxruntime_the_fallback_runs(monkeypatch):
    """onnxruntime missing: the same layer runs on the PyTorch path, saying why."""
    monkeypatch.setattr(ort_kernel.importlib.util, "find_spec", lambda name: None)
    layer = _layer()
    x = torch.randn(2, 96)
    assert "onnxruntime is not installed" in layer.kernel_reason(x)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))


def test_autograd_flows_through_the_fallback(ort):
    layer = _layer()
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(4, -1))


def test_session_follows_torch_threads(ort):
    layer = _layer()
    x = torch.randn(2, 96)
    layer(x)
    assert layer._ort._threads == torch.get_num_threads() == 1
    torch.set_num_threads(2)
    try:
        layer(x)
        assert layer._ort._threads == 2
        assert layer._ort._session.get_session_options().intra_op_num_threads == 2
    finally:
        torch.set_num_threads(1)


def test_copies_and_pickles_rebuild_their_own_session(ort):
    layer = _layer()
    x = torch.randn(2, 96)
    y = layer(x)
    assert layer._ort._session is not None
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other._ort._session is None
        assert torch.equal(other(x), y)
    state = layer.state_dict()
    assert not any("ort" in k for k in state)  # the session is never saved


def test_convert_passes_the_kernel_choice(ort):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    for m in (model[0], model[2]):
        m.qweight = quantize_tensor(m.weight.detach(), bits=4, granularity="group:32")
        m.weight.data.copy_(m.qweight.dequantize())
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = model(x)
        fast = convert(copy.deepcopy(model))
        slow = convert(copy.deepcopy(model), kernel="torch")
        assert all(m.kernel_reason(x) is None for m in fast.modules() if isinstance(m, QuantLinear))
        assert torch.equal(slow(x), ref)
        torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown kernel"):
        convert(copy.deepcopy(model), kernel="gpu")
