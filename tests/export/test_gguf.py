"""GGUF export: specquant's codes written exactly as Q4_0 / Q8_0 blocks, refusals, llama.cpp round trip.

The written file is read back two independent ways: by the ``gguf`` package's own dequantization
(``models.llama_gguf.load_llama_gguf``, which also undoes llama.cpp's RoPE row order) and, when
the set-up installed it, by llama.cpp itself (``llama-cpp-python``), whose logits must match the
quantized model's.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import specquant as sq
from specquant.export.gguf import (
    GGUFVocab,
    export_gguf,
    gguf_float_layers,
    gguf_type,
    halves_to_pairs,
    pack_block_codes,
)
from specquant.models.llama2c import rope_pairs_to_halves
from specquant.models.llama_gguf import load_llama_gguf, open_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 300  # ids 0..2 special, 3..258 bytes, then a few pieces


def tiny_llama(seed: int = 0, hidden: int = 64, inter: int = 96, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def spm_vocab(n: int = VOCAB) -> GGUFVocab:
    """A sentencepiece-style ("llama") vocabulary llama.cpp accepts: specials, 256 byte tokens, pieces."""
    from gguf import GGUFValueType as T

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return GGUFVocab({
        "tokenizer.ggml.model": ("llama", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": ([0.0] * n, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32, None),
    })


def quantized(model, method="rtn", bits=4, **kw):
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = sq.algorithms.make_config(method, bits=bits, granularity=kw.pop("granularity", "group:32"),
                                    scale_dtype=kw.pop("scale_dtype", "float16"), **kw)
    sq.quantize(model, cfg, calib=calib)
    return model


def test_rope_permutation_inverts_the_loader():
    w = torch.randn(32, 8)
    assert torch.equal(rope_pairs_to_halves(halves_to_pairs(w, 4), 4), w)
    s = torch.randn(32, 3, 1)  # per-row scales keep their trailing dims
    assert torch.equal(halves_to_pairs(s, 4)[:, :, 0], halves_to_pairs(s[:, :, 0], 4))


@pytest.mark.parametrize("bits,kind", [(4, "Q4_0"), (8, "Q8_0")])
def test_blocks_decode_to_the_codes_exactly(bits, kind):
    """The packed bytes, decoded by the gguf package, equal the fake-quant weight bit for bit."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from specquant.algorithms import QuantContext, RTNConfig
    from specquant.algorithms.rtn import quantize_weight

    w = torch.randn(6, 96) * torch.logspace(-2, 1, 6)[:, None]
    qw = quantize_weight(w, None, RTNConfig(bits=bits, granularity="group:32", scale_dtype="float16"),
                         QuantContext("w", 0))
    assert gguf_type(qw, "w") == kind
    blocks = pack_block_codes(qw, kind)
    assert blocks.shape == (6, 3 * (18 if bits == 4 else 34))
    back = dequantize(blocks, GGMLQuantizationType[kind])
    assert np.array_equal(back, qw.dequantize().numpy())


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("gptq", 4), ("rtn", 8)])
def test_export_round_trip_identical_logits(tmp_path, method, bits):
    model = quantized(tiny_llama(), method, bits)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    want = model(x).logits
    res = export_gguf(model, tmp_path / "m.gguf", spm_vocab())
    assert res.type == ("Q4_0" if bits == 4 else "Q8_0") and res.bytes == (tmp_path / "m.gguf").stat().st_size
    back = load_llama_gguf(tmp_path / "m.gguf")
    assert torch.equal(back(x).logits, want)
    # the file holds what the format dictates: blocks of 32 at 18 (Q4_0) / 34 (Q8_0) bytes, F32 elsewhere
    per_block = 18 if bits == 4 else 34
    n_q = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers.") and
              isinstance(m, torch.nn.Linear))
    n_f = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "embed" in n)
    assert res.expected_bytes == n_q // 32 * per_block + 4 * n_f
    assert res.expected_bytes <= res.bytes <= res.expected_bytes * 1.01 + 64 * 1024  # header, tokenizer, padding


def test_saved_and_loaded_model_exports_the_same_file(tmp_path):
    model = quantized(tiny_llama(seed=3), "gptq", 4)
    export_gguf(model, tmp_path / "a.gguf", spm_vocab())
    sq.save(model, tmp_path / "m.safetensors", arch="tests.export.test_gguf:tiny_llama")
    loaded = sq.load(tmp_path / "m.safetensors", build=lambda: tiny_llama(seed=9))
    export_gguf(loaded, tmp_path / "b.gguf", spm_vocab())
    ra, rb = open_gguf(tmp_path / "a.gguf"), open_gguf(tmp_path / "b.gguf")
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        assert ta.name == tb.name and np.array_equal(np.asarray(ta.data), np.asarray(tb.data))


def test_protected_layers_become_q8_0_and_float_layers_f32(tmp_path):
    model = tiny_llama(inter=80)  # down_proj reads 80 inputs: no GGUF block fits
    skip = gguf_float_layers(model)
    assert sorted(skip) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    modules = {n: sq.algorithms.ModuleSettings(skip=True) for n in skip}
    modules["model.layers.0.self_attn.*"] = sq.algorithms.ModuleSettings(bits=8)
    quantized(model, "gptq", 4, modules=modules)
    res = export_gguf(model, tmp_path / "m.gguf", spm_vocab())
    assert res.type == "mixed(Q4_0,Q8_0)"
    assert res.tensors["blk.0.attn_q.weight"] == "Q8_0" and res.tensors["blk.1.attn_q.weight"] == "Q4_0"
    assert res.tensors["blk.0.ffn_down.weight"] == "F32"
    x = torch.randint(0, VOCAB, (1, 16))
    assert torch.equal(load_llama_gguf(tmp_path / "m.gguf")(x).logits, model(x).logits)
    # float layers as F16 (llama.cpp's own fallback): those weights rounded to float16, the codes untouched
    res16 = export_gguf(model, tmp_path / "h.gguf", spm_vocab(), float_type="F16")
    assert res16.tensors["blk.0.ffn_down.weight"] == "F16" and res16.type == res.type
    back = dict(load_llama_gguf(tmp_path / "h.gguf").named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            want = mod.weight.half().float() if name in skip else mod.weight
            assert torch.equal(back[name].weight, want), name


@pytest.mark.parametrize("kw,needle", [
    ({"granularity": "channel"}, "granularity channel"),
    ({"granularity": "group:64"}, "granularity group:64"),
    ({"scale_dtype": "float32"}, "float32 scales"),
    ({"bits": 3}, "3-bit"),
    ({"bits": 8, "symmetric": False}, "asymmetric 8-bit"),
])
def test_refuses_what_gguf_cannot_hold(tmp_path, kw, needle):
    bits = kw.pop("bits", 4)
    model = quantized(tiny_llama(), "rtn", bits, **kw)
    with pytest.raises(ValueError) as e:
        export_gguf(model, tmp_path / "m.gguf", spm_vocab())
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.0.self_attn.q_proj" in msg and needle in msg
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_refuses_other_architectures(tmp_path):
    with pytest.raises(ValueError, match="Llama-architecture"):
        export_gguf(torch.nn.Linear(4, 4), tmp_path / "m.gguf", spm_vocab())


# --------------------------------------------------------------------------- llama.cpp itself


def require_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python is not installed (make installs it with the 'runtimes' extra)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {reason}", pytrace=False)
        pytest.skip(reason)
    from specquant.export import llamacpp

    return llamacpp


@pytest.mark.parametrize("bits,kw", [(4, {}), (8, {}), (4, {"symmetric": False, "scale_dtype": "float16-q4_1"})])
def test_llama_cpp_runs_the_export_with_matching_logits(tmp_path, bits, kw):
    llamacpp = require_llama_cpp()
    model = quantized(tiny_llama(seed=5), "gptq", bits, **kw)
    export_gguf(model, tmp_path / "m.gguf", spm_vocab())
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(4))
    with llamacpp.LlamaCppModel(tmp_path / "m.gguf", n_ctx=64, threads=1) as runner:
        got = torch.from_numpy(runner.logits(ids.tolist()))  # (40, vocab)
    want = model(ids[None]).logits[0]
    # llama.cpp multiplies with its own kernels (activations rounded to 8 bits for Q4_0/Q8_0 dot
    # products): close, not bit-identical.  Next-token choices must agree almost everywhere.
    rel = (got - want).norm() / want.norm()
    assert rel < 0.02, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_llama_cpp_perplexity_agrees_with_specquant_on_stories260k(data_dir, tmp_path):
    """The issue's check on a real model: llama.cpp's perplexity of the exported Q4_0 file within 1 %
    of specquant's perplexity of the same quantized model (same windows, same token ids)."""
    llamacpp = require_llama_cpp()
    from specquant.eval.perplexity import perplexity
    from specquant.export.gguf import vocab_for_entry
    from specquant.models import get_model

    model, entry = get_model("stories260k", data_dir)
    calib = entry.calib(8, 0, data_dir, seq_len=128)
    skip = {n: sq.algorithms.ModuleSettings(skip=True) for n in gguf_float_layers(model)}
    cfg = sq.GPTQConfig(bits=4, granularity="group:32", scale_dtype="float16", modules=skip)
    sq.quantize(model, cfg, calib=calib)
    export_gguf(model, tmp_path / "s.gguf", vocab_for_entry(entry, 512, data_dir))
    ids, _ = entry.test(data_dir)
    ours = perplexity(model, ids, 128, 4)
    with llamacpp.LlamaCppModel(tmp_path / "s.gguf", n_ctx=128, threads=1) as runner:
        theirs = perplexity(runner, ids, 128, 4)
    assert theirs.predicted == ours.predicted == 4 * 127
    assert abs(theirs.perplexity / ours.perplexity - 1) < 0.01, (theirs.perplexity, ours.perplexity)


def test_q4_1_blocks_hold_the_asymmetric_grid_exactly(tmp_path):
    """Q4_1 = d·q + m: the asymmetric grid s·(q − z) with scales kept to 7 significant bits, so that
    m = −z·s is exact in float16; plain float16 scales are refused (m would be re-rounded)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from specquant.core.grid import round_scale

    s = round_scale(torch.rand(1000) * 3 + 1e-3, "float16-q4_1")
    z = torch.arange(16, dtype=torch.float64).repeat(63)[:1000]
    assert torch.equal((z * s.double()).half().double(), z * s.double())  # every 4-bit zero point

    model = quantized(tiny_llama(seed=6), "gptq", 4, symmetric=False, scale_dtype="float16-q4_1")
    qw = model.model.layers[0].self_attn.q_proj.qweight
    assert gguf_type(qw, "q") == "Q4_1"
    assert np.array_equal(dequantize(pack_block_codes(qw, "Q4_1"), GGMLQuantizationType.Q4_1),
                          qw.dequantize().numpy())
    res = export_gguf(model, tmp_path / "m.gguf", spm_vocab())
    assert res.type == "Q4_1"
    x = torch.randint(0, VOCAB, (1, 16))
    assert torch.equal(load_llama_gguf(tmp_path / "m.gguf")(x).logits, model(x).logits)

    plain = quantized(tiny_llama(seed=6), "rtn", 4, symmetric=False, scale_dtype="float16")
    with pytest.raises(ValueError, match="not exact in float16"):
        export_gguf(plain, tmp_path / "p.gguf", spm_vocab())


def test_hf_folder_bpe_tokenizer_is_written_and_llama_cpp_loads_it(tmp_path):
    """A Hugging Face folder's tokenizer.json (byte-level BPE) becomes llama.cpp's "gpt2" vocabulary:
    tokens and merges as stored; llama.cpp loads the file and tokenizes with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from specquant.export.gguf import vocab_from_tokenizer_json

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "hello world"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    vocab = vocab_from_tokenizer_json(tmp_path / "tokenizer.json", VOCAB)
    tokens = vocab.fields["tokenizer.ggml.tokens"][0]
    assert len(tokens) == VOCAB and vocab.fields["tokenizer.ggml.model"][0] == "gpt2"
    assert tokens[tok.token_to_id("<|endoftext|>")] == "<|endoftext|>" and vocab.fields["tokenizer.ggml.merges"][0]
    model = quantized(tiny_llama(seed=7), "rtn", 4)
    export_gguf(model, tmp_path / "m.gguf", vocab)
    (tmp_path / "w.json").write_text('{"model": {"type": "WordLevel", "vocab": {}}}')
    with pytest.raises(ValueError, match="WordLevel"):
        vocab_from_tokenizer_json(tmp_path / "w.json", VOCAB)
    if importlib.util.find_spec("llama_cpp") is None:
        require_llama_cpp()  # skips (fails under CI) with the reason
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    try:
        ids = llm.tokenize(b"the cat sat", add_bos=False)
        assert ids == tok.encode("the cat sat").ids
    finally:
        llm.close()
