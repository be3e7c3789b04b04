import pytest
import torch
from torch import nn

import specquant as sq
from specquant.algorithms import GPFQConfig, GPTQConfig, RTNConfig, SPFQConfig
from specquant.engine.apply import quantize


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def make(seed=0):
    torch.manual_seed(seed)
    return Res().eval()


def calib(n=64, seed=1):
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def rel_err(model, ref_model, x):
    with torch.no_grad():
        a, b = model(x), ref_model(x)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", [RTNConfig(bits=3), GPFQConfig(bits=3), SPFQConfig(bits=3), GPTQConfig(bits=3),
                                 SPFQConfig(bits=3, order=3, rounding="nearest")])
def test_every_method_quantizes_every_layer_onto_its_grid(cfg):
    model, ref = make(), make()
    x = calib()
    report = quantize(model, cfg, x)
    names = [r.name for r in report.layers]
    assert names == ["stem", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.1.b", "fc"]
    assert [f.bn for f in report.folded_bn] == ["bn"]
    for name in names:
        mod = model.get_submodule(name)
        qw = mod.qweight
        assert qw.codes.dtype == torch.uint8 and qw.codes.shape == mod.weight.shape
        assert int(qw.codes.max()) <= qw.spec.qmax and int(qw.codes.min()) >= qw.spec.qmin
        torch.testing.assert_close(qw.dequantize(), mod.weight.detach())  # weight holds the dequantized codes
        assert len(torch.unique(mod.weight.detach()[0])) <= qw.levels
    rec = report.layers[0]
    assert rec.levels == 7 and rec.bits == 3 and rec.rel_output_error is not None
    assert 0 < rel_err(model, ref, x) < 0.5


def test_gpfq_end_to_end_error_beats_rtn_on_same_grid():
    x = calib(128)
    errs = {}
    for cfg in (RTNConfig(bits=3, scale_rule="mse"), GPFQConfig(bits=3, scale_rule="mse")):
        model, ref = make(), make()
        quantize(model, cfg, x)
        errs[cfg.method] = rel_err(model, ref, x)
    assert errs["gpfq"] < errs["rtn"]


def test_overrides_and_skip():
    model = make()
    cfg = GPFQConfig(bits=2, overrides={"blocks.1.*": 4, "fc": 8}, skip=("blocks.0.b",))
    report = quantize(model, cfg, calib())
    bits = {r.name: r.bits for r in report.layers}
    assert bits == {"stem": 2, "blocks.0.a": 2, "blocks.1.a": 4, "blocks.1.b": 4, "fc": 8}
    assert any(s.name == "blocks.0.b" for s in report.skipped)
    assert report.avg_bits == pytest.approx(
        sum(r.bits * r.params for r in report.layers) / sum(r.params for r in report.layers))


def test_reproducible_with_seed():
    a, b = make(), make()
    ra = quantize(a, SPFQConfig(bits=3, seed=7), calib())
    rb = quantize(b, SPFQConfig(bits=3, seed=7), calib())
    for la, lb in zip(ra.layers, rb.layers):
        assert la.rel_output_error == lb.rel_output_error
    assert all(torch.equal(a.get_submodule(n).qweight.codes, b.get_submodule(n).qweight.codes)
               for n in ("stem", "fc"))


def test_bias_correction_matches_mean_output():
    x = calib(256)
    model, ref = make(), make()
    quantize(model, RTNConfig(bits=2, bias_correction=True), x, fold_bn=True)
    with torch.no_grad():
        # the first layer sees identical inputs: its mean output must match the float model exactly
        ref_stem = ref.bn(ref.stem(x)).mean((0, 2, 3))
        q_stem = model.stem(x).mean((0, 2, 3))
    torch.testing.assert_close(q_stem, ref_stem, rtol=1e-4, atol=1e-4)


def test_data_free_rtn_needs_no_calibration():
    model = make()
    report = quantize(model, RTNConfig(bits=4), example_input=calib(2))
    assert len(report.layers) == 6 and report.layers[0].rel_output_error is None


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="does not fit the model at layer 'stem'"):
        quantize(make(), GPFQConfig(bits=3), torch.randn(8, 5, 12, 12))
    with pytest.raises(ValueError, match="empty"):
        quantize(make(), GPFQConfig(bits=3), torch.empty(0, 3, 12, 12))
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(make(), GPFQConfig(bits=3), None)
    bad = make()
    with torch.no_grad():
        bad.blocks[1].b.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'blocks.1.b' weight has 1 non-finite"):
        quantize(bad, GPFQConfig(bits=3), calib())
    with pytest.raises(ValueError, match="1..8"):
        quantize(make(), GPFQConfig(bits=9), calib())
    with pytest.raises(ValueError, match="bits override"):
        quantize(make(), GPFQConfig(bits=3, overrides={"fc": 0}), calib())


def test_public_api_names():
    for name in ("quantize", "quantize_tensor", "RTNConfig", "GPFQConfig", "SPFQConfig", "GPTQConfig"):
        assert hasattr(sq, name), name
