"""The SmoothQuant pre-step on modules (engine/smoothquant.py): folds that leave a tiny Llama's
logits unchanged, groups without a producer skipped with their reason, the smaller per-tensor
activation quantization error it exists for (an ordering on a model with injected outlier
channels), and the config/report fields."""
import copy

import pytest
import torch
import transformers
from torch import nn

import specquant as sq
from specquant.algorithms import ModuleSettings, RTNConfig
from specquant.core.actquant import calibrate_activation
from specquant.engine.calibrate import as_batches
from specquant.engine.smoothquant import apply_smoothquant

pytestmark = pytest.mark.usefixtures("one_thread")
HOT = [5, 21, 44]  # hidden channels blown up 30× by the norms: the activation outliers SmoothQuant targets


def tiny_llama(hot=True):
    """A random Llama (hidden 64, 2 blocks) whose norms make a few channels 30× larger."""
    cfg = transformers.LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if hot:
        with torch.no_grad():
            for block in model.model.layers:
                block.input_layernorm.weight[HOT] *= 30
                block.post_attention_layernorm.weight[HOT] *= 30
    return model


def ids(seed=1, n=8, t=24):
    return torch.randint(0, 80, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_fold_leaves_the_logits_unchanged_and_records_each_group():
    model = tiny_llama()
    x = ids()
    y0 = logits(model, x)
    recs = apply_smoothquant(model, RTNConfig(bits=8, smoothquant=0.5), as_batches(x, 8))
    y1 = logits(model, x)
    assert float((y1 - y0).abs().max() / y0.abs().max()) < 1e-5
    by_first = {r.layers[0].split("layers.")[-1]: r for r in recs}
    for key, kind in (("0.self_attn.q_proj", "norm"), ("0.mlp.gate_proj", "norm"), ("1.mlp.down_proj", "up_proj")):
        r = by_first[key]
        assert r.folded and r.kind == kind and r.alpha == 0.5 and r.reason is None
        # α = 0.5 balances the peaks: the largest smoothed activation equals the largest scaled weight
        assert r.act_max_after == pytest.approx(r.weight_max_after, rel=1e-4)
        assert r.act_max_after < r.act_max
    assert by_first["0.self_attn.q_proj"].layers[1:] == ["model.layers.0.self_attn.k_proj",
                                                          "model.layers.0.self_attn.v_proj"]
    skipped = by_first["0.self_attn.o_proj"]
    assert not skipped.folded and "no module to fold the scales into" in skipped.reason


def _rel_product_error(model, layer, x, bits, scale_in=None):
    """‖Q(X) Wᵀ − X Wᵀ‖ / ‖X Wᵀ‖ for ``layer``'s input X with a per-tensor min-max ``bits``-bit quantizer."""
    seen = []
    h = model.get_submodule(layer).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    logits(model, x)
    h.remove()
    X = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])  # (m, N0)
    aq = calibrate_activation(X.reshape(-1), bits, "minmax")
    W = model.get_submodule(layer).weight.detach()
    ref = X @ W.T
    return float((aq.fake_quantize(X) @ W.T - ref).norm() / ref.norm())


def test_smoothing_lowers_the_per_tensor_activation_error_on_outlier_channels():
    plain = tiny_llama()
    smooth = copy.deepcopy(plain)
    x = ids()
    apply_smoothquant(smooth, RTNConfig(bits=8, smoothquant=0.5), as_batches(x, 8))
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        e_plain, e_smooth = (_rel_product_error(m, layer, ids(seed=2), 6) for m in (plain, smooth))
        assert e_smooth < 0.6 * e_plain, (layer, e_plain, e_smooth)


def test_w8a6_through_quantize_is_closer_to_float_with_smoothquant():
    x, test = ids(), ids(seed=3)
    ref = logits(tiny_llama(), test)
    errs = {}
    for alpha in (None, 0.5):
        model = tiny_llama()
        cfg = RTNConfig(bits=8, act_bits=6, act_calibrator="minmax", smoothquant=alpha,
                        modules={"lm_head": ModuleSettings(skip=True)})
        report = sq.quantize(model, cfg, calib=x, progress=False)
        assert bool(report.smoothquant) == (alpha is not None)
        assert ("smoothquant" in report.to_dict()) == (alpha is not None)
        errs[alpha] = float((logits(model, test) - ref).norm() / ref.norm())
    assert errs[0.5] < errs[None]


def test_config_field_is_checked_and_absent_when_off():
    assert "smoothquant" not in RTNConfig(bits=8).to_dict()
    cfg = RTNConfig(bits=8, smoothquant=1)
    assert cfg.to_dict()["smoothquant"] == 1.0 and cfg.needs_data
    for bad in (-0.5, 1.01, "0.5", True):
        with pytest.raises(ValueError, match=r"config.smoothquant \(SmoothQuant α\) must be a number in \[0, 1\]"):
            RTNConfig(bits=8, smoothquant=bad)


def test_without_data_it_is_one_line():
    with pytest.raises(ValueError, match="SmoothQuant .* needs calibration data"):
        apply_smoothquant(tiny_llama(), RTNConfig(bits=8, smoothquant=0.5), None)


def test_a_cnn_keeps_its_function_and_says_why_groups_are_skipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
                        nn.Linear(16, 4)).eval()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = net(x)
    report = sq.quantize(net, RTNConfig(bits=8, smoothquant=0.5), calib=x, progress=False)
    reasons = {tuple(r.layers): r.reason for r in report.smoothquant}
    assert all(not r.folded for r in report.smoothquant)
    assert "input is the output of" in reasons[("5",)] or "no module" in reasons[("5",)]
    assert "a convolution's input is not smoothed" in reasons[("0",)]
    with torch.no_grad():
        assert float((net(x) - y0).abs().max() / y0.abs().max()) < 0.05  # 8-bit weights only


def test_per_token_granularity_refuses_convolutions():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    with pytest.raises(ValueError, match=r"layer '0': per-token activation quantization .* is for Linear inputs"):
        sq.quantize(net, RTNConfig(bits=8, act_bits=8, act_granularity="token"), calib=torch.randn(4, 3, 6, 6),
                    progress=False)


class OffsetRMSNorm(nn.Module):
    """Looks like a norm by its name, but scales by (1 + weight): a fold into it changes the function."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.fc1 = nn.RMSNorm(32), nn.Linear(32, 32)
        self.norm2, self.fc2 = OffsetRMSNorm(32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.norm2(self.fc1(self.norm1(x))))


def test_a_fold_that_changes_the_function_is_found_and_only_it_is_undone():
    torch.manual_seed(0)
    net = TwoNorms().eval()
    with torch.no_grad():
        net.norm1.weight.mul_(torch.linspace(0.1, 20, 32))  # outlier channels to migrate
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0 = net(x)
    ref = copy.deepcopy(net)
    good, bad = apply_smoothquant(net, RTNConfig(bits=8, smoothquant=0.5), [x])
    assert good.folded and good.layers == ["fc1"] and good.predecessor == "norm1"
    assert not bad.folded and "moved the model's output" in bad.reason and bad.act_max_after is None
    assert torch.equal(net.norm2.weight, ref.norm2.weight) and torch.equal(net.fc2.weight, ref.fc2.weight)
    assert not torch.equal(net.fc1.weight, ref.fc1.weight)
    with torch.no_grad():
        assert float((net(x) - y0).abs().max() / y0.abs().max()) < 1e-5


def test_folds_in_small_batches_equal_one_batch_with_one_probe_per_batch(monkeypatch):
    import specquant.engine.awq as awq_mod

    x = ids()
    one = tiny_llama()
    apply_smoothquant(one, RTNConfig(bits=8, smoothquant=0.5), as_batches(x, 8))
    calls = []
    real_probe = awq_mod.probe_output
    monkeypatch.setattr(awq_mod, "probe_output", lambda m, e: calls.append(1) or real_probe(m, e))
    small = tiny_llama()
    budget = max(sum(p.numel() * 4 for p in m.parameters()) for m in small.model.layers[0].mlp.children())
    recs = apply_smoothquant(small, RTNConfig(bits=8, smoothquant=0.5), as_batches(x, 8), fold_batch_bytes=budget)
    assert len(calls) > 2 and all(r.folded for r in recs if r.predecessor is not None)
    for (n, a), (_, b) in zip(one.state_dict().items(), small.state_dict().items()):
        assert torch.equal(a, b), n
