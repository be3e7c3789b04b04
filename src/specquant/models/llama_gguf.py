"""Llama-architecture GGUF files (llama.cpp's format) as ``transformers``' ``LlamaForCausalLM``.

A GGUF file holds metadata (key → value) and tensors, each stored in a ggml type (F32, F16, Q8_0,
Q4_1, ...).  The ``gguf`` package reads the file (memory-mapped) and dequantizes each tensor to
float32 exactly (Q4_1: ``d·q + m`` per block of 32 weights, ``d`` and ``m`` float16; Q8_0:
``d·q``).  The float reference of a quantized GGUF is this dequantized model in float32.

Tensor names: ``token_embd`` → ``model.embed_tokens``; in block ``blk.{i}``: ``attn_norm`` →
``input_layernorm``, ``attn_q``/``attn_k``/``attn_v``/``attn_output`` → ``self_attn.{q,k,v,o}_proj``,
``ffn_norm`` → ``post_attention_layernorm``, ``ffn_gate``/``ffn_up``/``ffn_down`` →
``mlp.{gate,up,down}_proj``; ``output_norm`` → ``model.norm``; ``output`` → ``lm_head`` (absent:
the head is tied to the embedding).  The reader gives each tensor as a numpy array of shape
(rows, cols), the PyTorch order (the file lists shapes innermost first).  llama.cpp's converter
permutes the rows of ``attn_q`` and ``attn_k`` of each head from Hugging Face's rotated halves to
interleaved RoPE pairs (the layout llama.cpp rotates); they are permuted back here.

The tokenizer is ``transformers``' conversion of the vocabulary stored in the file
(``AutoTokenizer.from_pretrained(folder, gguf_file=...)``, offline).  For the ``smollm``
pre-tokenizer, llama.cpp splits every digit on its own before the GPT-2 split; the conversion
does not, so that split is put back (it changes 8 of the 304,986 tokens of the WikiText-2 test
text for SmolLM2).

Every problem is a one-line error naming the file: not a GGUF, not llama, a missing key or
tensor, a shape that disagrees with the metadata, a non-finite weight.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from specquant.models.llama2c import rope_pairs_to_halves

# GGUF tensor name inside block i -> Hugging Face module name inside model.layers.i
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# GGUF tensor name outside the blocks -> Hugging Face module name
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Metadata keys of features this loader does not implement (a model using them would run wrong).
UNSUPPORTED_KEYS = ("llama.rope.scaling.type", "llama.expert_count", "llama.attention.key_length",
                    "llama.attention.value_length")


@dataclass(frozen=True)
class LlamaGGUFConfig:
    """The architecture a llama GGUF file describes (its metadata and tensor shapes)."""

    vocab_size: int  # tokens: rows of token_embd
    hidden_size: int  # model width (llama.embedding_length)
    intermediate_size: int  # FFN width (llama.feed_forward_length)
    num_hidden_layers: int  # decoder blocks (llama.block_count)
    num_attention_heads: int  # query heads (llama.attention.head_count)
    num_key_value_heads: int  # key/value heads, grouped-query attention (llama.attention.head_count_kv)
    context_length: int  # the context it was trained for (llama.context_length)
    rope_theta: float  # RoPE base frequency (llama.rope.freq_base)
    rms_norm_eps: float  # RMSNorm epsilon, shortest decimal of the stored float32
    tie_word_embeddings: bool  # the file has no output tensor: lm_head is the token embedding
    bos_token_id: int | None  # tokenizer.ggml.bos_token_id (never added for perplexity)
    eos_token_id: int | None  # tokenizer.ggml.eos_token_id

    def llama_config(self):
        """The equivalent ``transformers.LlamaConfig`` (float32, no RoPE scaling, no biases)."""
        from transformers import LlamaConfig  # slow to import: loaded when a model is

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.context_length,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=None,
            attention_bias=False, mlp_bias=False, hidden_act="silu",
        )

    def differences(self, other: LlamaGGUFConfig) -> list[str]:
        """``"name got (expected want)"`` for each field where ``self`` differs from ``other``."""
        return [f"{f.name} {getattr(self, f.name)} (expected {getattr(other, f.name)})" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); one-line errors for a missing or foreign file."""
    from gguf import GGUFReader  # a dependency of language models only

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist or is not a regular file")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:  # bad magic, truncated, corrupted
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable GGUF file ({first})") from None


def _meta(reader, path: Path, key: str, required: bool = True):
    field = reader.get_field(key)
    if field is None:
        if required:
            raise ValueError(f"{path}: the GGUF metadata has no {key!r}")
        return None
    return field.contents()


def read_llama_config(reader, path: str | Path) -> LlamaGGUFConfig:
    """The architecture of the llama GGUF file open in ``reader`` (checked for what this loader supports)."""
    path = Path(path)
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: a GGUF of architecture {arch!r}; only 'llama' is supported")
    for key in UNSUPPORTED_KEYS:
        value = _meta(reader, path, key, required=False)
        if value not in (None, 0, "none"):
            raise ValueError(f"{path}: the GGUF sets {key} = {value!r}, which this loader does not implement")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: the GGUF has no tensor 'token_embd.weight'")
    hidden = int(_meta(reader, path, "llama.embedding_length"))
    heads = int(_meta(reader, path, "llama.attention.head_count"))
    kv_heads = int(_meta(reader, path, "llama.attention.head_count_kv", required=False) or heads)
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError(f"{path}: width {hidden} with {heads} heads and {kv_heads} key/value heads is not a "
                         f"valid Llama attention")
    rope_dim = _meta(reader, path, "llama.rope.dimension_count", required=False)
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise ValueError(f"{path}: RoPE over {rope_dim} of the {hidden // heads} dimensions of each head "
                         f"(partial rotary) is not supported")
    vocab = int(names["token_embd.weight"].data.shape[0])  # (vocab, hidden) in PyTorch order
    meta_vocab = _meta(reader, path, "llama.vocab_size", required=False)
    if meta_vocab is not None and int(meta_vocab) != vocab:
        raise ValueError(f"{path}: llama.vocab_size {meta_vocab} but token_embd has {vocab} rows")
    eps = float(_meta(reader, path, "llama.attention.layer_norm_rms_epsilon"))
    bos = _meta(reader, path, "tokenizer.ggml.bos_token_id", required=False)
    eos = _meta(reader, path, "tokenizer.ggml.eos_token_id", required=False)
    return LlamaGGUFConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(_meta(reader, path, "llama.feed_forward_length")),
        num_hidden_layers=int(_meta(reader, path, "llama.block_count")),
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        context_length=int(_meta(reader, path, "llama.context_length")),
        rope_theta=float(_meta(reader, path, "llama.rope.freq_base", required=False) or 10000.0),
        rms_norm_eps=float(str(np.float32(eps))),  # 9.99999974738e-06 stored -> 1e-05
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
    )


def _hf_name(name: str, n_layers: int) -> str | None:
    """The Hugging Face parameter name of the GGUF tensor ``name`` (None when it is not one we know)."""
    base, _, suffix = name.rpartition(".")
    if suffix != "weight":
        return None
    if base in TOP_TENSORS:
        return TOP_TENSORS[base] + ".weight"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers \
            and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{int(parts[1])}.{BLOCK_TENSORS[parts[2]]}.weight"
    return None


def dequantized_tensors(reader, path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized to float32, by GGUF name, in PyTorch's (rows, cols) order."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{path}: cannot dequantize {t.name} of type {t.tensor_type.name}: {e}") from None
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))  # the file lists the innermost dimension first
        if w.shape != expected:
            raise ValueError(f"{path}: {t.name} dequantizes to shape {w.shape}, its header says {expected}")
        out[t.name] = np.asarray(w, dtype=np.float32)
    return out


def load_llama_gguf(path: str | Path, expect: LlamaGGUFConfig | None = None):
    """The llama GGUF at ``path`` as a float32 ``LlamaForCausalLM`` in eval mode, its quantized weights
    dequantized.  With ``expect``, a file of another architecture is a one-line error listing the
    differences."""
    from transformers import LlamaForCausalLM  # slow to import: loaded when a model is

    path = Path(path)
    reader = open_gguf(path)
    config = read_llama_config(reader, path)
    if expect is not None and config != expect:
        raise ValueError(f"{path}: not the expected architecture: {'; '.join(config.differences(expect))}")
    arrays = dequantized_tensors(reader, path)
    del reader  # releases the memory map
    model = LlamaForCausalLM(config.llama_config())
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, w in arrays.items():
        hf = _hf_name(name, config.num_hidden_layers)
        if hf is None:
            raise ValueError(f"{path}: unexpected GGUF tensor {name!r} (not part of a plain Llama)")
        if tuple(w.shape) != want[hf]:
            raise ValueError(f"{path}: {name} has shape {tuple(w.shape)}, the architecture needs {want[hf]}")
        if not np.isfinite(w).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
        t = torch.from_numpy(w.copy())  # (rows, cols) or (n,)
        if hf.endswith("q_proj.weight"):
            t = rope_pairs_to_halves(t, config.num_attention_heads)  # (heads·head_dim, hidden)
        elif hf.endswith("k_proj.weight"):
            t = rope_pairs_to_halves(t, config.num_key_value_heads)  # (kv_heads·head_dim, hidden)
        state[hf] = t
    missing = sorted(set(want) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise ValueError(f"{path}: the GGUF lacks {len(missing)} weights of the architecture, e.g. {missing[0]!r}")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer stored in the GGUF at ``path`` (``transformers``' conversion, offline), with
    llama.cpp's digit split put back for the ``smollm`` pre-tokenizer (see the module docstring)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer  # slow to import: loaded when a model is

    path = Path(path)
    pre = _meta(open_gguf(path), path, "tokenizer.ggml.pre", required=False)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot build its tokenizer: {first}") from None
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok
