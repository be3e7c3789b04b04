"""The method registry: names, configs by name, one signature for every method, and how to add one.

How to add a method (``ToyConfig``/``toy_quantize_weight`` below are a complete example): write a
config dataclass extending ``QuantConfig`` whose class attribute ``method`` is the method's name,
and a pure function ``quantize_weight(W, stats, config, ctx) -> QuantizedWeight`` on the (out, N0)
weight matrix; call ``register_method(name, ConfigType, quantize_weight, summary)`` when the
module is imported.  ``specquant.quantize(model, ToyConfig(...), calib)`` then runs it on every
layer, with the per-module settings of ``config.modules`` resolved before the call.
"""
import dataclasses
import inspect

import pytest
import torch
from torch import nn

import specquant as sq
from specquant.algorithms import (
    FrameConfig,
    GPFQConfig,
    LayerStats,
    ModuleSettings,
    QuantConfig,
    QuantContext,
    get_method,
    make_config,
    method_names,
    register_method,
)
from specquant.algorithms import base as algorithms_base
from specquant.core.quantizer import quantize_tensor

BUILT_IN = ("rtn", "gpfq", "spfq", "gptq", "qronos", "frame", "awq")


# --------------------------------------------------------------------------- a method from outside


@dataclasses.dataclass
class ToyConfig(QuantConfig):
    """Min-max round-to-nearest (or unbiased random rounding): a method defined outside specquant."""

    stochastic: bool = False  # random rounding, seeded by ctx.seed

    method = "toy"
    needs_data = False


CALLS: list[QuantContext] = []


def toy_quantize_weight(W: torch.Tensor, stats: LayerStats | None, config: ToyConfig, ctx: QuantContext | None = None):
    """W (out, N0) on a min-max grid of ``config.bits`` bits."""
    CALLS.append(ctx)
    qw = quantize_tensor(W, bits=config.bits, granularity=config.granularity, symmetric=config.symmetric,
                         clipping="minmax", rounding="stochastic" if config.stochastic else "nearest",
                         seed=None if ctx is None else ctx.seed, name=f"layer '{getattr(ctx, 'layer', '?')}' weight")
    return dataclasses.replace(qw, algorithm="toy")


@pytest.fixture
def toy(monkeypatch):
    """Register the toy method as a plugin module would at import (undone after the test)."""
    monkeypatch.setattr(algorithms_base, "_METHODS", dict(algorithms_base._METHODS))
    CALLS.clear()
    return register_method("toy", ToyConfig, toy_quantize_weight, "min-max round-to-nearest (a test method)")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_a_method_registered_from_outside_runs_through_quantize(toy):
    assert method_names() == BUILT_IN + ("toy",) and get_method("toy") is toy
    assert isinstance(make_config("toy", bits=3), ToyConfig)
    model = mlp()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    cfg = ToyConfig(bits=4, seed=5, modules={"2": ModuleSettings(bits=2), "4": ModuleSettings(skip=True)})
    report = sq.quantize(model, cfg, x, progress=False)
    assert report.method == "toy" and report.config["method"] == "toy"
    assert [(r.name, r.bits, r.method) for r in report.layers] == [("0", 4, "toy"), ("2", 2, "toy")]
    assert CALLS == [QuantContext("0", 5), QuantContext("2", 5)]  # the engine's context: layer and seed
    ref = mlp()
    for name, bits in (("0", 4), ("2", 2)):
        w = ref.get_submodule(name).weight.detach()
        want = quantize_tensor(w, bits=bits, clipping="minmax").dequantize()
        assert torch.equal(model.get_submodule(name).weight.detach(), want)
        assert model.get_submodule(name).qweight.algorithm == "toy"
    assert torch.equal(model[4].weight, ref[4].weight) and not hasattr(model[4], "qweight")
    # the seed reaches the method: same seed, same random rounding; another seed, other codes
    codes = []
    for seed in (5, 5, 6):
        m = mlp()
        sq.quantize(m, ToyConfig(bits=2, stochastic=True, seed=seed), x, progress=False)
        codes.append(m[0].qweight.codes)
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


def test_registering_checks_the_pieces(toy):
    with pytest.raises(ValueError, match="method 'toy' is already registered"):
        register_method("toy", ToyConfig, lambda W, stats, config, ctx: None, "another")
    assert register_method("toy", ToyConfig, toy_quantize_weight, "min-max round-to-nearest (a test method)") is toy
    with pytest.raises(ValueError, match=r"ToyConfig.method is 'toy', not 'toy2'"):
        register_method("toy2", ToyConfig, toy_quantize_weight, "x")
    with pytest.raises(ValueError, match=r"quantize_weight must take \(W, stats, config, ctx\)"):
        register_method("toy", ToyConfig, lambda W, stats, config: None, "x")
    with pytest.raises(ValueError, match="must be a QuantConfig dataclass"):
        register_method("toy", dict, toy_quantize_weight, "x")
    with pytest.raises(ValueError, match="one non-empty line"):
        register_method("toy", ToyConfig, toy_quantize_weight, "two\nlines")
    with pytest.raises(ValueError, match="non-empty word"):
        register_method("to y", ToyConfig, toy_quantize_weight, "x")
    assert method_names() == BUILT_IN + ("toy",)


# --------------------------------------------------------------------------- the built-in methods


def test_names_in_a_stable_order_with_their_config_types_and_summaries():
    assert method_names() == BUILT_IN
    for name in BUILT_IN:
        m = get_method(name)
        assert m.name == name and m.config_type.method == name and issubclass(m.config_type, QuantConfig)
        assert m.summary and "\n" not in m.summary
    assert get_method("gpfq").config_type is GPFQConfig and get_method("frame").config_type is FrameConfig


def test_make_config_builds_by_name_and_names_what_is_wrong():
    cfg = make_config("gpfq", bits=3, granularity="group:8", seed=2)
    assert isinstance(cfg, GPFQConfig) and (cfg.bits, cfg.seed) == (3, 2)
    assert cfg.granularity == sq.Granularity("group", group_size=8)
    assert make_config("frame", redundancy=3.0).redundancy == 3.0
    with pytest.raises(ValueError) as e:
        make_config("nope", bits=3)
    assert str(e.value) == "unknown method 'nope'; allowed: rtn, gpfq, spfq, gptq, qronos, frame, awq"
    with pytest.raises(ValueError) as e:
        make_config("rtn", bitz=3)
    assert str(e.value).startswith("unknown setting 'bitz' for method 'rtn'; allowed: bits, granularity,")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown setting 'redundancy' for method 'gpfq'"):
        make_config("gpfq", redundancy=2.0)
    with pytest.raises(ValueError, match="unknown setting 'skip'"):  # the old keywords are not settings
        make_config("gpfq", skip=("fc",))
    with pytest.raises(ValueError, match=r"config.bits must be an integer in 1..8, got 9"):
        make_config("rtn", bits=9)
    with pytest.raises(ValueError, match="unknown granularity 'row'"):
        make_config("rtn", granularity="row")
    with pytest.raises(ValueError, match="granularity"):
        make_config("frame", granularity="group:8")


def _stats(W: torch.Tensor) -> LayerStats:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, W.shape[1], generator=g, dtype=torch.float64)
    Xt = X + 0.05 * torch.randn(200, W.shape[1], generator=g, dtype=torch.float64)
    return LayerStats(H=Xt.T @ Xt, G=Xt.T @ X, F=X.T @ X, n_rows=200, mean_x=X.mean(0), mean_xt=Xt.mean(0))


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_method_has_the_one_signature(name):
    m = get_method(name)
    params = inspect.signature(m.quantize_weight).parameters
    assert list(params) == ["W", "stats", "config", "ctx"]
    assert params["ctx"].default is None  # a call outside the engine: layer "layer", seed config.seed
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    stats = _stats(W)
    cfg = m.config_type(bits=3, seed=4)
    qw = m.quantize_weight(W, stats, cfg, QuantContext(layer="fc", seed=4))
    assert qw.algorithm == name and qw.bits == 3
    W_hat = qw.dequantize()
    assert W_hat.shape == W.shape and W_hat.dtype == W.dtype and torch.isfinite(W_hat).all()
    assert 0 < float((W - W_hat).norm() / W.norm()) < 0.6
    again = m.quantize_weight(W, stats, cfg)  # ctx=None: the config's seed, so the same result
    assert torch.equal(again.codes, qw.codes) and torch.equal(again.scale, qw.scale)

