import pytest
import torch
from torch import nn

import specquant as sq
from specquant.algorithms import GPFQConfig, GPTQConfig, ModuleSettings, RTNConfig, SPFQConfig
from specquant.core.layouts import RowsLayout
from specquant.engine.apply import quantize
from specquant.nn import convert


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


def skip(*names):
    return {n: ModuleSettings(skip=True) for n in names}


def test_per_module_bits_and_skip():
    model = make()
    cfg = GPFQConfig(bits=2, modules={"blocks.1.*": ModuleSettings(bits=4), "fc": ModuleSettings(bits=8),
                                      **skip("blocks.0.b")})
    report = quantize(model, cfg, calib())
    bits = {r.name: r.bits for r in report.layers}
    assert bits == {"stem": 2, "blocks.0.a": 2, "blocks.1.a": 4, "blocks.1.b": 4, "fc": 8}
    assert any(s.name == "blocks.0.b" for s in report.skipped)
    # 3-level (2-bit symmetric) layers are stored five codes per byte: 1.6 bits per weight
    assert {r.name: r.code_bits for r in report.layers} == {
        "stem": 1.6, "blocks.0.a": 1.6, "blocks.1.a": 4.0, "blocks.1.b": 4.0, "fc": 8.0}
    assert report.avg_bits == pytest.approx(
        sum(r.code_bits * r.params for r in report.layers) / sum(r.params for r in report.layers))


def test_per_module_granularity_is_that_layers_own():
    # blocks.1.b at per-tensor scales, the rest per channel: the layer comes out exactly as when the
    # whole model is quantized per tensor with only that layer (same inputs: the layers before are
    # quantized the same way in both runs)
    x = calib()
    model = make()
    quantize(model, GPTQConfig(bits=3, modules={"blocks.1.b": ModuleSettings(granularity="tensor")}), x,
             progress=False)
    assert model.get_submodule("blocks.1.b").qweight.granularity.kind == "tensor"
    assert all(model.get_submodule(n).qweight.granularity.kind == "channel"
               for n in ("stem", "blocks.0.a", "blocks.0.b", "blocks.1.a", "fc"))
    ref = make()
    quantize(ref, GPTQConfig(bits=3, granularity="tensor", modules={
        **{n: ModuleSettings(granularity="channel") for n in ("stem", "blocks.0.a", "blocks.0.b", "blocks.1.a")},
        **skip("fc")}), x, progress=False)
    assert torch.equal(model.blocks[1].b.qweight.codes, ref.blocks[1].b.qweight.codes)
    assert torch.equal(model.blocks[1].b.qweight.scale, ref.blocks[1].b.qweight.scale)


def test_old_config_keywords_build_the_same_map():
    # skip=, overrides= and row_bits= (before the map existed) still construct, deprecated,
    # and quantize exactly like the map they stand for
    widths = (2, 4, 3, 2, 8, 4, 1, 3)
    with pytest.warns(DeprecationWarning, match="modules="):
        old = GPFQConfig(bits=2, overrides={"blocks.1.*": 4, "fc": 8}, skip=("blocks.0.b",),
                         row_bits={"stem": widths})
    assert old.modules == {"stem": ModuleSettings(row_bits=widths), "blocks.0.b": ModuleSettings(skip=True),
                           "blocks.1.*": ModuleSettings(bits=4), "fc": ModuleSettings(bits=8)}
    new = GPFQConfig(bits=2, modules=dict(old.modules))
    a, b = make(), make()
    ra, rb = quantize(a, old, calib(), progress=False), quantize(b, new, calib(), progress=False)
    assert [(r.name, r.bits, r.rel_output_error) for r in ra.layers] == [(r.name, r.bits, r.rel_output_error)
                                                                          for r in rb.layers]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        GPFQConfig(skip=("fc",), modules={"stem": ModuleSettings(bits=3)})


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
    with pytest.raises(ValueError, match="ModuleSettings.bits must be an integer in 1..8, got 0"):
        ModuleSettings(bits=0)


def test_public_api_names():
    for name in ("quantize", "quantize_tensor", "RTNConfig", "GPFQConfig", "SPFQConfig", "GPTQConfig"):
        assert hasattr(sq, name), name


@pytest.mark.parametrize("cfg", [RTNConfig(), GPFQConfig(), GPTQConfig()], ids=lambda c: c.method)
def test_per_row_widths_equal_each_width_on_its_own_rows(cfg):
    # only the stem is quantized, so every run sees the same inputs: a row of width b must come
    # out exactly as that row of the whole layer quantized at b (rows are independent given X)
    import copy
    import dataclasses

    widths = (2, 4, 3, 2, 8, 4, 1, 3)
    others = ("blocks.*", "fc")
    mixed = make()
    rep = quantize(mixed, dataclasses.replace(cfg, modules={"stem": ModuleSettings(row_bits=widths), **skip(*others)}),
                   calib(), progress=False)
    qw = mixed.stem.qweight
    assert qw.row_bits.tolist() == list(widths) and qw.bits == 8 and isinstance(qw.layout, RowsLayout)
    rec = rep.layers[0]
    assert rec.row_bits == list(widths) and rec.bits == 8
    row_len = qw.codes[0].numel()
    stored = sum(1.6 if b == 2 else b for b in widths) * row_len
    assert rec.code_bits == pytest.approx(stored / qw.codes.numel())
    assert rep.avg_bits == pytest.approx(rec.code_bits)
    for b in sorted(set(widths)):
        ref = make()
        quantize(ref, dataclasses.replace(cfg, bits=b, modules=skip(*others)), calib(), progress=False)
        rows = [i for i, w in enumerate(widths) if w == b]
        assert torch.equal(qw.codes[rows], ref.stem.qweight.codes[rows]), b
        assert torch.equal(qw.scale[rows], ref.stem.qweight.scale[rows]), b
        assert torch.allclose(mixed.stem.weight[rows], ref.stem.weight[rows], rtol=0, atol=1e-6)
    packed = convert(copy.deepcopy(mixed))  # the packed layer holds each row at its own width
    assert torch.equal(packed.stem.packed.unpack(), qw.codes)


def test_per_row_widths_with_a_stochastic_method_are_seeded_and_on_each_rows_grid():
    # SPFQ draws its random rounding per call, so rows of one width do not repeat the uniform run's
    # draws; what must hold: each row on its own grid, and the same seed gives the same codes
    from specquant.core.grid import GridSpec

    widths = (2, 4, 3, 2, 8, 4, 1, 3)
    runs = []
    for _ in range(2):
        m = make()
        quantize(m, SPFQConfig(modules={"stem": ModuleSettings(row_bits=widths), **skip("blocks.*", "fc")}), calib(),
                 progress=False)
        runs.append(m.stem.qweight)
    assert torch.equal(runs[0].codes, runs[1].codes)
    for r, b in enumerate(widths):
        g = GridSpec.default(b, True)
        c = runs[0].codes[r]
        assert int(c.min()) >= g.qmin and int(c.max()) <= g.qmax


def test_per_row_widths_errors_name_the_layer():
    with pytest.raises(ValueError, match="row_bits for layer 'stem' has 3 widths, the layer has 8 rows"):
        quantize(make(), RTNConfig(modules={"stem": ModuleSettings(row_bits=(2, 3, 4))}), calib())
    with pytest.raises(ValueError, match="row width must be an integer in 1..8, got 9"):
        ModuleSettings(row_bits=(9,) * 8)
    with pytest.raises(ValueError, match="layer 'stem': per-row widths need granularity 'channel', not 'tensor'"):
        quantize(make(), RTNConfig(granularity="tensor", modules={"stem": ModuleSettings(row_bits=(2,) * 8)}), calib())
    with pytest.raises(ValueError, match="layer 'stem': per-row widths need granularity 'channel', not 'group:3'"):
        quantize(make(), RTNConfig(modules={"stem": ModuleSettings(row_bits=(2,) * 8, granularity="group:3")}), calib())
    with pytest.raises(ValueError, match="layer 'blocks.0.a': per-row widths are not supported on grouped"):
        quantize(make(), RTNConfig(modules={"blocks.0.a": ModuleSettings(row_bits=(2,) * 8)}), calib())
