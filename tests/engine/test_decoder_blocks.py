"""Transformers through the engine: each decoder layer is a block, blocks are chained through
their cached outputs (with the same attention mask / position embeddings), projections that read
one input share one statistics pass, the KV cache stays off — and none of it changes a number."""
import copy

import pytest
import torch
import transformers

import specquant as sq
import specquant.engine.apply as apply_mod
from specquant.engine.calibrate import block_links, find_blocks


def _llama(layers=3, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n=6, length=20):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(3))


def _layers(model):
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]


def test_each_decoder_layer_is_a_block_and_blocks_chain():
    model = _llama()
    blocks = find_blocks(model, _layers(model))
    assert blocks == ["model.layers.0", "model.layers.1", "model.layers.2"]
    links = block_links(model, blocks, _ids(2))
    assert [links[b].prev for b in blocks[1:]] == blocks[:-1]  # kwargs (mask, rotary) are the same objects


def test_residual_blocks_stay_whole():
    """A module holding a layer directly (a residual block) is not opened, containers are."""
    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.inner = torch.nn.Sequential(torch.nn.Linear(8, 8))

        def forward(self, x):
            return x + self.inner(self.a(x))

    model = torch.nn.Sequential(Res(), Res())
    assert find_blocks(model, ["0.a", "0.inner.0", "1.a", "1.inner.0"]) == ["0", "1"]


@pytest.mark.parametrize("cfg", [sq.GPTQConfig(bits=3, granularity="group:16", symmetric=False),
                                 sq.GPFQConfig(bits=3)], ids=["gptq", "gpfq"])
def test_decoder_blocks_give_the_same_model_as_one_block(monkeypatch, cfg):
    """Walking decoder layers as chained blocks (and sharing q/k/v, gate/up statistics) is only a
    faster way to the same statistics: the model equals a walk that treats the stack as one block
    and streams each layer on its own."""
    torch.set_num_threads(1)
    base = _llama()
    ids = _ids()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    calls = {"n": 0}
    stream = apply_mod.stream_layer_stats

    def counted(*a, **k):
        calls["n"] += 1
        return stream(*a, **k)

    monkeypatch.setattr(apply_mod, "stream_layer_stats", counted)
    r_fast = sq.quantize(fast, cfg, calib=ids, progress=False)
    assert calls["n"] == 3 * 4  # per block: q/k/v together, o, gate/up together, down
    monkeypatch.setattr(apply_mod, "find_blocks", lambda model, names: ["model"])
    monkeypatch.setattr(apply_mod, "_same_input", lambda name, *a: [name])
    r_slow = sq.quantize(slow, cfg, calib=ids, progress=False)
    assert [r.name for r in r_fast.layers] == [r.name for r in r_slow.layers]
    for a, b in zip(r_fast.layers, r_slow.layers):
        assert a.rel_output_error == pytest.approx(b.rel_output_error, rel=1e-4, abs=1e-9), a.name  # float32 GEMM order
    x = _ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, slow(x).logits, rtol=1e-5, atol=1e-5)
    assert r_fast.peak_rss_mb > 0


def test_kv_cache_is_off_during_the_walk_and_restored():
    model = _llama(layers=2)
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("cache", k.get("past_key_values"))), with_kwargs=True)
    assert model.config.use_cache is True
    sq.quantize(model, sq.GPTQConfig(bits=4), calib=_ids(), progress=False)
    hook.remove()
    assert seen and all(c is None for c in seen)
    assert model.config.use_cache is True
