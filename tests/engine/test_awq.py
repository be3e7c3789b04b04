"""The AWQ pre-step on modules (engine/awq.py): the groups of layers sharing an input and where
their scales fold, folds that leave the float model's output unchanged, the cases where folding
would change another consumer (skipped with a reason), and AWQ through ``sq.quantize``: lower
output error than without it, with RTN and GPTQ, saved and loaded to identical logits."""
import copy
import functools

import pytest
import torch
import transformers
from torch import nn

import specquant as sq
from specquant.algorithms import AWQConfig, GPTQConfig, ModuleSettings, RTNConfig
from specquant.engine.awq import apply_awq, find_awq_groups, fold_awq
from specquant.io import load, save

OUTLIERS = torch.tensor([3, 17, 40, 58])  # hidden channels made 20× larger, as activation outliers in LLMs


def _llama(folder=None, outliers=True):
    """A tiny random Llama (hidden 64, 2 layers); its norms blow a few channels up 20×."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[OUTLIERS] *= 20
                layer.post_attention_layernorm.weight[OUTLIERS] *= 20
    if folder is not None:
        model.save_pretrained(folder)
        model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    return model


def _build_from(folder):
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder)).eval()


def _ids(seed=1, n=16, t=32):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


class LNNet(nn.Module):
    """inp -> LayerNorm -> (a, b) -> relu(a) + b -> out -> head: a/b share the norm's output, head
    reads out's output directly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.ln = nn.LayerNorm(64)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.out = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.ln(self.inp(x))
        return self.head(self.out(torch.relu(self.a(h)) + self.b(h)))


def _lnnet():
    torch.manual_seed(0)
    net = LNNet().eval()
    with torch.no_grad():
        net.ln.weight.uniform_(0.5, 1.5)
        net.ln.bias.normal_(0, 0.1)
        net.ln.weight[:4] *= 20  # outlier channels
    return net


def test_groups_of_a_llama():
    model = _llama()
    groups = {tuple(n.split(".", 3)[-1] if n.startswith("model.layers.") else n for n in g.layers): g
              for g in find_awq_groups(model, _ids()[:2]) if g.layers[0].startswith(("model.layers.0.", "lm_head"))}
    qkv = groups[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert (qkv.predecessor, qkv.kind, qkv.reason) == ("model.layers.0.input_layernorm", "norm", None)
    gu = groups[("mlp.gate_proj", "mlp.up_proj")]
    assert (gu.predecessor, gu.kind) == ("model.layers.0.post_attention_layernorm", "norm")
    down = groups[("mlp.down_proj",)]
    assert (down.predecessor, down.kind) == ("model.layers.0.mlp.up_proj", "up_proj")
    o = groups[("self_attn.o_proj",)]
    assert o.predecessor is None and "no module to fold the scales into" in o.reason
    assert groups[("lm_head",)].reason is not None  # reads a slice of the final norm's output
    assert len(find_awq_groups(model, _ids()[:2])) == 2 * 4 + 1


def test_folding_keeps_the_float_logits_of_a_llama():
    model = _llama()
    ref = copy.deepcopy(model)
    records = apply_awq(model, RTNConfig(bits=3, granularity="group:32", symmetric=False, awq=True, awq_grid=10,
                                         scale_rule="minmax"), list(_ids().split(8)))
    folded = [r for r in records if r.folded]
    assert {r.kind for r in folded} == {"norm", "up_proj"} and len(folded) == 6  # 3 groups per block
    assert all(0 < r.alpha < 1 and r.loss < r.loss_plain and r.rel_error < r.rel_error_plain for r in folded)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)
    x = _ids(seed=5, n=4)
    with torch.no_grad():
        assert _rel(model(x).logits, ref(x).logits) < 1e-5


def test_folding_keeps_a_layernorm_net_and_folds_into_a_linear():
    net = _lnnet()
    ref = copy.deepcopy(net)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(2))
    groups = {tuple(g.layers): g for g in find_awq_groups(net, x[:2])}
    assert (groups[("a", "b")].predecessor, groups[("a", "b")].kind) == ("ln", "norm")
    assert (groups[("head",)].predecessor, groups[("head",)].kind) == ("out", "linear")
    assert groups[("inp",)].reason is not None and groups[("out",)].reason is not None
    records = {tuple(r.layers): r for r in apply_awq(net, RTNConfig(bits=3, awq=True, scale_rule="minmax"),
                                                     list(x.split(64)))}
    assert records[("a", "b")].folded and records[("a", "b")].alpha > 0
    with torch.no_grad():
        assert _rel(net(x), ref(x)) < 1e-5
    # by hand: columns of the layers times s, rows (and bias) of the Linear before them divided by s
    net = _lnnet()
    s = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)
    fold_awq(net, ["head"], s, "out")
    fold_awq(net, ["a", "b"], s.flip(0), "ln")
    assert torch.allclose(net.head.weight, ref.head.weight * s.float())
    assert torch.allclose(net.out.weight, ref.out.weight / s.float()[:, None])
    assert torch.allclose(net.out.bias, ref.out.bias / s.float())
    assert torch.allclose(net.ln.bias, ref.ln.bias / s.flip(0).float())
    with torch.no_grad():
        assert _rel(net(x), ref(x)) < 1e-5


class SharedNorm(nn.Module):
    """One norm called twice (a shared module), one whose output also feeds a residual, and a
    layer whose weight is tied to another's."""

    def __init__(self):
        super().__init__()
        self.shared = nn.LayerNorm(32)
        self.p, self.q = nn.Linear(32, 32), nn.Linear(32, 32)
        self.res_norm = nn.LayerNorm(32)
        self.r = nn.Linear(32, 32)
        self.tie_norm = nn.LayerNorm(32)
        self.t = nn.Linear(32, 32)
        self.u = nn.Linear(32, 32)
        self.u.weight = self.t.weight  # tied

    def forward(self, x):
        y = self.p(self.shared(x)) + self.q(self.shared(x + 1))
        h = self.res_norm(y)
        y = h + self.r(h)  # the norm's output is read by the residual too
        return self.t(self.tie_norm(y)) + self.u(y)


class CatNet(nn.Module):
    """The norm's output is also concatenated into the result (read inside a list argument)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.fc(h), h], -1)


class OffsetRMSNorm(nn.Module):
    """Gemma-style RMSNorm, x·(1 + w): dividing w by s does not divide the output by s."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class OffsetNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = OffsetRMSNorm(32)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_folds_that_would_change_another_consumer_are_skipped_with_a_reason():
    torch.manual_seed(0)
    net = SharedNorm().eval()
    ref = copy.deepcopy(net)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    x[:, :3] *= 30
    records = {tuple(r.layers): r for r in apply_awq(net, RTNConfig(bits=3, awq=True, scale_rule="minmax"),
                                                     list(x.split(32)))}
    assert "called more than once" in records[("p",)].reason
    assert "also read by" in records[("r",)].reason
    assert "shared with another module (tied)" in records[("t",)].reason
    assert all(not r.folded for r in records.values())
    for (_, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b)

    (group,) = find_awq_groups(CatNet().eval(), x[:2])
    assert group.predecessor is None and "also read by torch op" in group.reason

    torch.manual_seed(0)
    net = OffsetNet().eval()
    with torch.no_grad():
        net.norm.weight.normal_(0, 0.5)
    ref = copy.deepcopy(net)
    group = find_awq_groups(net, x[:2])[0]
    assert (group.predecessor, group.kind) == ("norm", "norm")  # by name: it looks like a norm
    (rec,) = apply_awq(net, RTNConfig(bits=3, awq=True, scale_rule="minmax"), [x])
    assert rec.alpha is None and not rec.folded and "moved the model's output" in rec.reason
    assert torch.equal(net.norm.weight, ref.norm.weight) and torch.equal(net.fc.weight, ref.fc.weight)  # undone


class GoodAndOffsetNet(nn.Module):
    """Two branches: one behind a plain LayerNorm (its fold keeps the function), one behind a
    Gemma-style norm (its fold changes it)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.a = nn.Linear(32, 8)
        self.norm = OffsetRMSNorm(32)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):
        return self.a(self.ln(x)) + self.fc(self.norm(x))


def test_a_batch_with_one_bad_fold_keeps_the_good_one_and_undoes_the_bad(monkeypatch):
    torch.manual_seed(0)
    net = GoodAndOffsetNet().eval()
    with torch.no_grad():
        net.norm.weight.normal_(0, 0.5)
        net.ln.weight[:3] *= 20
    ref = copy.deepcopy(net)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    x[:, :3] *= 30
    records = {tuple(r.layers): r for r in apply_awq(net, RTNConfig(bits=3, awq=True, scale_rule="minmax"), [x])}
    good, bad = records[("a",)], records[("fc",)]
    assert good.folded and 0 < good.alpha
    assert not bad.folded and bad.alpha is None and "moved the model's output" in bad.reason
    assert not torch.equal(net.ln.weight, ref.ln.weight)
    assert torch.equal(net.norm.weight, ref.norm.weight) and torch.equal(net.fc.weight, ref.fc.weight)  # undone
    with torch.no_grad():
        assert _rel(net.a(net.ln(x)), ref.a(ref.ln(x))) < 1e-5  # the good fold kept the function


def test_folds_are_checked_with_one_probe_per_batch_and_equal_group_by_group(monkeypatch):
    import specquant.engine.awq as awq_mod

    cfg = RTNConfig(bits=3, granularity="group:32", symmetric=False, awq=True, awq_grid=10, scale_rule="minmax")
    batches = list(_ids().split(8))
    calls = []
    real_probe = awq_mod.probe_output
    monkeypatch.setattr(awq_mod, "probe_output", lambda m, e: calls.append(1) or real_probe(m, e))
    model = _llama()
    apply_awq(model, cfg, batches)
    assert len(calls) == 2  # the float output once, then one check for all six folds
    # With a budget that holds one group's copies at a time, every fold gets its own probe:
    # the same weights, bit for bit.
    calls.clear()
    one_by_one = _llama()
    budget = max(sum(p.numel() * 4 for p in m.parameters()) for m in one_by_one.model.layers[0].mlp.children())
    apply_awq(one_by_one, cfg, batches, fold_batch_bytes=2 * budget)
    assert len(calls) > 2
    for (n, a), (_, b) in zip(model.state_dict().items(), one_by_one.state_dict().items()):
        assert torch.equal(a, b), n


def test_layers_left_in_float_are_scaled_but_not_scored_and_no_data_is_an_error():
    net = _lnnet()
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(4))
    cfg = RTNConfig(bits=3, awq=True, modules={"a": ModuleSettings(skip=True), "b": ModuleSettings(skip=True)})
    rec = {tuple(r.layers): r for r in apply_awq(net, cfg, [x])}[("a", "b")]
    assert rec.alpha is None and "left in float" in rec.reason
    with pytest.raises(ValueError, match="needs calibration data"):
        sq.quantize(_lnnet(), RTNConfig(bits=3, awq=True), progress=False)


def _logit_error(model, ref, x):
    with torch.no_grad():
        y, y0 = model(x).logits, ref(x).logits
    return float((y - y0).norm() / y0.norm())


def test_quantize_with_awq_lowers_the_output_error():
    ids, x = _ids(), _ids(seed=7, n=4)
    ref = _llama()
    errors = {}
    for awq in (False, True):
        model = _llama()
        cfg = RTNConfig(bits=3, granularity="group:32", symmetric=False, awq=awq)
        report = sq.quantize(model, cfg, calib=ids, progress=False)
        errors[awq] = (_logit_error(model, ref, x), {r.name: r.rel_output_error for r in report.layers})
        assert (report.to_dict().get("awq") is not None) == awq and report.config.get("awq", False) == awq
    (plain, plain_layers), (awq, awq_layers) = errors[False], errors[True]
    assert awq < 0.85 * plain  # measured 0.374 vs 0.480
    for block in ("model.layers.0", "model.layers.1"):  # the layers behind the norms
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert awq_layers[f"{block}.{name}"] < plain_layers[f"{block}.{name}"]
    method_errors = {}
    for rule in ("minmax", "output-mse"):  # the "awq" method: AWQ scales, then RTN on min/max ranges or after
        model = _llama()  # AWQ's clipping search (the default)
        report = sq.quantize(model, AWQConfig(bits=3, granularity="group:32", symmetric=False, scale_rule=rule),
                             calib=ids, progress=False)
        assert report.method == "awq" and model.model.layers[0].mlp.down_proj.qweight.algorithm == "awq"
        method_errors[rule] = _logit_error(model, ref, x)
    assert AWQConfig().scale_rule == "output-mse"
    assert method_errors["minmax"] < 0.85 * plain  # measured 0.344
    assert method_errors["output-mse"] < method_errors["minmax"]  # the clipping search helps: measured 0.293


def test_awq_with_gptq_saves_and_loads_to_identical_logits(tmp_path):
    folder = tmp_path / "llama"
    model = _llama(folder)
    ref = copy.deepcopy(model)
    ids = _ids()
    calib = [{"input_ids": ids[:8], "attention_mask": torch.ones(8, 32, dtype=torch.long)},
             {"input_ids": ids[8:], "attention_mask": torch.ones(8, 32, dtype=torch.long)}]
    report = sq.quantize(model, GPTQConfig(bits=3, granularity="group:32", symmetric=False, awq=True),
                         calib=calib, progress=False)
    assert sum(r.folded for r in report.awq) >= 4
    x = _ids(seed=7, n=4)
    plain = copy.deepcopy(ref)
    sq.quantize(plain, GPTQConfig(bits=3, granularity="group:32", symmetric=False), calib=calib, progress=False)
    assert _logit_error(model, ref, x) < _logit_error(plain, ref, x)  # measured 0.198 vs 0.291
    build = functools.partial(_build_from, folder)
    loaded = load(save(model, tmp_path / "q.sq", arch=build), build=build)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
