"""``quantize`` on hostile inputs: non-finite data, tied weights, Linear subclasses, empty and meta layers."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specquant.algorithms import GPFQConfig, GPTQConfig, ModuleSettings, RTNConfig, SPFQConfig
from specquant.engine.apply import quantize
from specquant.engine.walk import fold_batchnorm
from specquant.nn import convert

METHODS = [RTNConfig(bits=3), GPFQConfig(bits=3), SPFQConfig(bits=3), GPTQConfig(bits=3)]


def ids(cfg):
    return cfg.method


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def convnet(seed=0):
    torch.manual_seed(seed)
    return ConvNet().eval()


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


MODELS = {
    "mlp": (mlp, lambda: torch.randn(64, 8, generator=gen()), "0"),
    "conv": (convnet, lambda: torch.randn(40, 3, 6, 6, generator=gen()), "c1"),
}


# -- 1. non-finite calibration data, activations and statistics --------------------------------


@pytest.mark.parametrize("cfg", METHODS, ids=ids)
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_sample_is_named(cfg, kind, bad):
    make, data, _first = MODELS[kind]
    x = data()
    x[37].view(-1)[3] = bad  # batch 1 of 32 samples, its sample 5
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^calibration input has NaN/inf at sample 37 \(batch 1\): ") as e:
        quantize(model, cfg, x, batch_size=32, progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was changed


@pytest.mark.parametrize("cfg", METHODS, ids=ids)
@pytest.mark.parametrize("kind", list(MODELS))
def test_inputs_that_overflow_float32_name_the_layer(cfg, kind):
    make, data, first = MODELS[kind]
    with pytest.raises(ValueError, match=rf"^layer '{first}': its input statistics overflow float32 at batch 0 "
                                         r"\(.* is not finite; \|x\| up to .*e\+30\): the inputs are too large, "
                                         r"rescale them"):
        quantize(make(), cfg, data() * 1e30, progress=False)


class Blows(nn.Module):
    """Finite weights and data, but exp() of a large pre-activation is inf inside the model."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        with torch.no_grad():
            self.a.weight.mul_(1e3)

    def forward(self, x):
        return self.b(torch.exp(self.a(x)))


@pytest.mark.parametrize("cfg", METHODS, ids=ids)
def test_non_finite_activation_names_layer_and_sample(cfg):
    torch.manual_seed(0)
    model = Blows().eval()
    x = torch.zeros(48, 8)
    x[29] = torch.randn(8, generator=gen()) * 10  # only sample 29 overflows
    with pytest.raises(ValueError, match=r"^layer 'b': its input in the float model has NaN/inf at sample 29 "
                                         r"\(batch 1\) .*non-finite activations"):
        quantize(model, cfg, x, batch_size=16, progress=False)


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_activation_that_only_the_quantized_model_overflows_is_named():
    # float: exp(79 + 0.3·30) = exp(88) < 3.4e38; quantized: 0.3 rounds to 1/3, exp(89) = inf
    model = nn.Sequential(nn.Linear(2, 1, bias=False), Exp(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.3]]))
    x = torch.tensor([[0.0, 0.0]] * 7 + [[79.0, 30.0]])  # (8, 2): only sample 7 overflows
    with pytest.raises(ValueError, match=r"^layer '2': its input in the partly quantized model has NaN/inf at "
                                         r"sample 7 \(batch 1\) .*layers quantized before it"):
        quantize(model, RTNConfig(bits=3, scale_rule="minmax"), x, batch_size=4, progress=False)


def test_relative_output_error_is_inf_not_zero_when_the_float_output_is_zero():
    # the float model's relu kills every input of 'b' (a(x) = -0.01), the quantized 'a' does not
    # (0.3 rounds to 1/3): ‖XWᵀ‖ = 0 while ‖XWᵀ − X̃Ŵᵀ‖ > 0
    model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.3]]))
        model[0].bias.fill_(-2.0)
        model[2].weight.copy_(torch.tensor([[1.0], [-0.5]]))
    x = torch.stack([torch.full((16,), 2.0 - 0.3 - 0.01), torch.ones(16)], 1)  # (16, 2)
    rep = quantize(model, RTNConfig(bits=3, scale_rule="minmax"), x, progress=False)
    errs = {r.name: r.rel_output_error for r in rep.layers}
    assert errs["0"] == pytest.approx((1 / 3 - 0.3) / (2 - 0.01), rel=1e-3)  # |xŵ − xw| / |xw|, bias aside
    assert errs["2"] == float("inf")


# -- 2. shared (tied) weights --------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # one Parameter, two layers

    def forward(self, x):
        return self.b(torch.relu(self.mid(torch.relu(self.a(x)))))


@pytest.mark.parametrize("cfg", METHODS, ids=ids)
def test_tied_weight_is_quantized_once_and_stays_tied(cfg):
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(64, 8, generator=gen())
    rep = quantize(model, cfg, x, progress=False)
    assert [r.name for r in rep.layers] == ["a", "mid"]
    assert {s.name: s.reason for s in rep.skipped}["b"] == "weight tied to 'a': quantized once there, tie kept"
    assert model.a.weight is model.b.weight and model.a.qweight is model.b.qweight
    W_hat = model.a.qweight.dequantize()
    assert torch.equal(W_hat, model.a.weight.detach())  # the weight holds the one set of codes
    with torch.no_grad():
        h = F.linear(torch.relu(F.linear(x, W_hat, model.a.bias)), model.mid.qweight.dequantize(), model.mid.bias)
        want = F.linear(torch.relu(h), W_hat, model.b.bias)
        torch.testing.assert_close(model(x), want)


def test_tied_weight_data_free_rtn_quantizes_once():
    torch.manual_seed(0)
    model = Tied().eval()
    w0 = model.a.weight.detach().clone()
    rep = quantize(model, RTNConfig(bits=3), progress=False)  # registration order, no data
    assert [r.name for r in rep.layers] == ["a", "mid"]
    assert model.a.weight is model.b.weight and model.a.qweight is model.b.qweight
    ref = nn.Linear(8, 8)
    with torch.no_grad():
        ref.weight.copy_(w0)
    quantize(nn.Sequential(ref), RTNConfig(bits=3), progress=False)
    assert torch.equal(model.b.weight, ref.weight)  # quantized once: the same as the float weight quantized


class TiedEmbedding(nn.Module):
    """A language-model head tied to the input embedding."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.emb(tokens))))


@pytest.mark.parametrize("cfg", [RTNConfig(bits=3), GPFQConfig(bits=3), GPTQConfig(bits=3)], ids=ids)
def test_weight_tied_to_an_embedding_stays_float(cfg):
    torch.manual_seed(0)
    model = TiedEmbedding().eval()
    emb0 = model.emb.weight.detach().clone()
    tokens = torch.randint(0, 20, (32, 5), generator=gen())
    rep = quantize(model, cfg, tokens, progress=False)
    assert [r.name for r in rep.layers] == ["fc"]
    reasons = {s.name: s.reason for s in rep.skipped}
    assert reasons["head"] == "weight tied to 'emb' (Embedding), which is not quantized: kept in float to keep the tie"
    assert model.head.weight is model.emb.weight and getattr(model.head, "qweight", None) is None
    assert torch.equal(model.emb.weight, emb0)


def test_weight_tied_to_an_excluded_layer_stays_float():
    torch.manual_seed(0)
    model = Tied().eval()
    w0 = model.a.weight.detach().clone()
    cfg = GPFQConfig(bits=3, modules={"b": ModuleSettings(skip=True)})
    rep = quantize(model, cfg, torch.randn(32, 8, generator=gen()), progress=False)
    assert [r.name for r in rep.layers] == ["mid"]
    reasons = {s.name: s.reason for s in rep.skipped}
    assert reasons["a"] == "weight tied to 'b' (Linear), which is not quantized: kept in float to keep the tie"
    assert torch.equal(model.a.weight, w0) and model.a.weight is model.b.weight


def test_module_registered_under_two_names_is_quantized_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    model.add_module("again", model[0])  # forward runs it twice, it has one weight
    x = torch.randn(32, 8, generator=gen())
    rep = quantize(model, GPFQConfig(bits=3), x, progress=False)
    assert [r.name for r in rep.layers] == ["0"]
    reasons = {s.name: s.reason for s in rep.skipped}
    assert reasons["again"] == "same module as '0', registered under a second name: quantized once there"
    assert torch.equal(model[0].qweight.dequantize(), model.again.weight.detach())


def test_bias_correction_does_not_move_a_bias_shared_with_another_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    model[2].bias = model[0].bias  # weights independent, one bias
    ref = copy.deepcopy(model)
    x = torch.randn(256, 8, generator=gen())
    quantize(model, RTNConfig(bits=2, bias_correction=True), x, progress=False)
    with torch.no_grad():  # each layer's mean output matches the float model's: its own shift only
        torch.testing.assert_close(model[0](x).mean(0), ref[0](x).mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x).mean(0), ref(x).mean(0), rtol=1e-4, atol=1e-5)


class SharedConvBN(nn.Module):
    """Two convs sharing one weight, each followed by its own BatchNorm."""

    def __init__(self, reuse=False):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a if reuse else nn.Conv2d(4, 4, 3, padding=1)
        if not reuse:
            self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        g = gen(3)
        for bn in (self.bn_a, self.bn_b):
            bn.running_mean.copy_(torch.randn(4, generator=g))
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            bn.weight.data.copy_(torch.randn(4, generator=g))

    def forward(self, x):
        return self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))


@pytest.mark.parametrize("reuse", [False, True], ids=["tied-weight", "called-twice"])
def test_batchnorm_is_not_folded_into_a_shared_conv(reuse):
    torch.manual_seed(0)
    model = SharedConvBN(reuse).eval()
    x = torch.randn(4, 4, 6, 6, generator=gen())
    with torch.no_grad():
        ref = model(x)
    assert fold_batchnorm(model, x) == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    rep = quantize(model, RTNConfig(bits=8), x, progress=False)
    assert rep.folded_bn == [] and [r.name for r in rep.layers] == ["a"]
    assert model.a.weight is model.b.weight


class AliasBN(nn.Module):
    """A BatchNorm registered under two names, called under the second."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.norm = self.bn
        self.bn.running_mean.copy_(torch.randn(4, generator=gen(4)))
        self.bn.weight.data.copy_(torch.randn(4, generator=gen(5)))

    def forward(self, x):
        return self.norm(self.conv(x))


def test_folded_batchnorm_is_replaced_under_every_name():
    torch.manual_seed(0)
    model = AliasBN().eval()
    x = torch.randn(4, 3, 6, 6, generator=gen())
    with torch.no_grad():
        ref = model(x)
    assert [(f.bn, f.into) for f in fold_batchnorm(model, x)] == [("bn", "conv")]
    assert isinstance(model.norm, nn.Identity) and isinstance(model.bn, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


# -- 3. subclasses of Linear (MultiheadAttention's out_proj) -------------------------------------


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.att(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("cfg,with_data", [(RTNConfig(bits=4), False), (GPFQConfig(bits=4), True)],
                         ids=["rtn-no-data", "gpfq-data"])
def test_linear_subclass_is_skipped_and_the_model_still_runs(cfg, with_data):
    torch.manual_seed(0)
    model = Attn().eval()
    x = torch.randn(16, 5, 8, generator=gen())
    rep = quantize(model, cfg, x if with_data else None, progress=False)
    assert [r.name for r in rep.layers] == ["fc"]
    reasons = {s.name: s.reason for s in rep.skipped}
    assert reasons["att.out_proj"] == ("NonDynamicallyQuantizableLinear is a subclass of Linear whose weight may be "
                                       "used outside its forward(): kept in float")
    assert getattr(model.att.out_proj, "qweight", None) is None
    with torch.no_grad():
        y = model(x)
        packed = convert(copy.deepcopy(model))  # the reloadable form runs and agrees
        torch.testing.assert_close(packed(x), y, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(y).all() and y.shape == (16, 5, 4)


# -- 4. layers with nothing to quantize, meta weights --------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("sizes,name,shape", [(((4, 4), (4, 0)), "1", "(0, 4)"),
                                              (((4, 0), (0, 4)), "0", "(0, 4)"),
                                              (((4, 4), (0, 4)), "1", "(4, 0)")],
                         ids=["out-0", "first-of-two", "in-0"])
@pytest.mark.parametrize("cfg", [RTNConfig(bits=3), GPFQConfig(bits=3)], ids=ids)
def test_zero_width_layer_is_named_up_front(sizes, name, shape, cfg):
    model = nn.Sequential(*(nn.Linear(*s) for s in sizes)).eval()
    with pytest.raises(ValueError, match="^" + re.escape(f"layer '{name}': weight has shape {shape}: "
                                                         "nothing to quantize") + "$"):
        quantize(model, cfg, torch.randn(16, 4), progress=False)


@pytest.mark.parametrize("cfg,data", [(RTNConfig(bits=3), None), (GPFQConfig(bits=3), torch.randn(16, 4))],
                         ids=["rtn-no-data", "gpfq-data"])
def test_meta_weights_are_named_up_front(cfg, data):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match=r"^layer '0': weight is on the meta device \(no data\); "
                                         "load real weights before quantizing$"):
        quantize(model, cfg, data, progress=False)
