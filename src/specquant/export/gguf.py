"""GGUF files for llama.cpp, written from specquant's own codes (no re-rounding).

GGUF (llama.cpp's format, written here with the ``gguf`` package) stores each tensor in a ggml
type.  Three of them hold exactly what specquant's group grids produce (``--gguf TYPE``):

* ``Q4_0``: blocks of 32 weights along a row, one float16 scale ``d`` and 32 4-bit codes
  ``q`` in 0..15; the value is ``d·(q − 8)``.  specquant's 4-bit symmetric grid with groups of
  32 and float16 scales (``QuantConfig(bits=4, granularity="group:32", scale_dtype="float16")``)
  has zero point 8 and codes 1..15 ("narrow") or 0..15 ("full"): the code *is* ``q``.
* ``Q8_0``: blocks of 32, one float16 ``d`` and 32 signed bytes ``q``; the value is ``d·q``.
  The 8-bit symmetric grid has zero point 128, so ``q = code − 128``.
* ``Q4_1``: blocks of 32, float16 ``d`` and ``m``, codes ``q`` in 0..15; the value is ``d·q + m``.
  specquant's 4-bit asymmetric grid gives ``s·(q − z)`` with an integer zero point ``z``, so
  ``d = s`` and ``m = −z·s``, which must be exact in float16: the scale dtype "float16-q4_1"
  keeps 7 significant bits of each float16 scale so that it is (checked per block on export).

A layer on any other grid (another width, group size or a shorter last group, float32 scales,
a frame or mixed-width rows) is refused with one line naming it: writing it would mean
re-rounding specquant's codes.  Layers left in float (not quantized, e.g. an input width that is
not a multiple of 32) are written as F32 (or F16 on request), the embeddings, the norms and a
float ``lm_head`` as F32.

llama.cpp rotates interleaved RoPE pairs where Hugging Face rotates the two halves of each head,
so the rows of ``attn_q`` / ``attn_k`` are permuted per head (codes and scales alike: a row
permutation keeps every 32-weight block intact).  The tokenizer is written from the model's own:
a GGUF's ``tokenizer.*`` metadata is copied, a llama2.c vocabulary becomes llama.cpp's "llama"
(sentencepiece) vocabulary, a Hugging Face ``tokenizer.json`` BPE its "gpt2" one.

The file is written to a temporary name beside the target and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specquant.core.qweight import QuantizedWeight
from specquant.io.files import fsync_dir
from specquant.models.llama_gguf import BLOCK_TENSORS, TOP_TENSORS

GGUF_BLOCK = 32  # weights per block of Q4_0 / Q8_0
# ggml type -> (bits of the grid, bytes per block of 32)
GGUF_TYPES = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q8_0": (8, 34)}
FILE_TYPES = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # general.file_type (llama_ftype): the file's main type
SPM_SPACE = "\u2581"  # sentencepiece's visible space


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote (the CLI prints it as JSON: ``file``, ``bytes``, ``format``, ``type``)."""

    file: str  # path of the written file
    bytes: int  # its size
    format: str  # "gguf" or "onnx"
    type: str  # the quantized weights' type: "Q4_0", "Q8_0", "mixed(Q4_0,Q8_0)"; "F32" when none is
    tensors: dict[str, str] = field(default_factory=dict)  # tensor name -> its type
    expected_bytes: int = 0  # the tensor data the format dictates (file size minus header and padding)
    notes: list[str] = field(default_factory=list)  # what was kept in float, and why

    def to_dict(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "format": self.format, "type": self.type,
                "expected_tensor_bytes": self.expected_bytes, "tensors": dict(self.tensors), "notes": list(self.notes)}


@dataclass
class GGUFVocab:
    """A tokenizer as GGUF metadata: ``tokenizer.*`` key -> (value, gguf value type, array item type)."""

    fields: dict[str, tuple] = field(default_factory=dict)  # key -> (value, GGUFValueType, sub type or None)

    def write(self, writer) -> None:
        for key, (value, vtype, sub) in self.fields.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)


# --------------------------------------------------------------------------- which ggml type


def _q4_1_minimum(qw: QuantizedWeight) -> torch.Tensor:
    """Q4_1's minimum m = −z·s of each block (float64; exact when it equals its float16 rounding)."""
    return -(qw.zero_point.double() * qw.scale.double())


def gguf_type(qw: QuantizedWeight | None, name: str) -> str:
    """The ggml type that holds ``qw`` exactly ("F32" when the layer is not quantized).

    ValueError (one line naming the layer) when no supported type holds it."""
    if qw is None:
        return "F32"
    problems = []
    spec, g = qw.spec, qw.granularity
    if spec.kind in ("narrow", "full") and spec.bits in (4, 8):
        kind = "Q4_0" if spec.bits == 4 else "Q8_0"
    elif spec.kind == "asymmetric" and spec.bits == 4:
        kind = "Q4_1"
    else:
        kind = None
        problems.append(f"grid {spec.kind} {spec.bits}-bit (Q4_0/Q8_0 hold 4-/8-bit symmetric codes, Q4_1 "
                        f"4-bit asymmetric)")
    if g.kind != "group" or g.group_size != GGUF_BLOCK or len(qw.shape) != 2:
        problems.append(f"granularity {g.label()} (GGUF blocks are groups of {GGUF_BLOCK} along the input)")
    elif qw.shape[1] % GGUF_BLOCK:
        problems.append(f"input width {qw.shape[1]} is not a multiple of {GGUF_BLOCK}")
    if qw.scale_dtype != torch.float16:
        problems.append("float32 scales (GGUF blocks store float16)")
    if qw.row_bits is not None or type(qw) is not QuantizedWeight:
        problems.append("mixed-width rows or frame codes")
    if not problems and kind != "Q4_1" and not bool(torch.all(qw.zero_point == spec.symmetric_zero_point)):
        problems.append("zero points other than the grid's own")
    if not problems and kind == "Q4_1":
        m = _q4_1_minimum(qw)
        bad = int((m.half().double() != m).sum())
        if bad:
            problems.append(f"{bad} of {m.numel()} block minima −z·s are not exact in float16 (Q4_1 stores them "
                            f"so; scale dtype float16-q4_1 keeps them exact)")
    if problems:
        raise ValueError(f"layer '{name}': GGUF cannot hold it exactly: {'; '.join(problems)}; quantize it with "
                         f"--gguf q4_0, q4_1 or q8_0 (or leave it in float)")
    return kind


def pack_block_codes(qw: QuantizedWeight, kind: str) -> np.ndarray:
    """The ggml blocks of ``qw`` as bytes, shape (rows, blocks·bytes_per_block) uint8."""
    rows, cols = qw.shape
    nb = cols // GGUF_BLOCK

    def f16_bytes(t: torch.Tensor) -> np.ndarray:  # (rows, nb) -> (rows, nb, 2) little-endian float16
        return t.reshape(rows, nb).to(torch.float16).numpy().view(np.uint8).reshape(rows, nb, 2)

    codes = qw.codes.reshape(rows, nb, GGUF_BLOCK).numpy().astype(np.int16)  # (rows, nb, 32) unsigned codes
    if kind in ("Q4_0", "Q4_1"):
        q = codes.astype(np.uint8)  # the code is q: value d·(q − 8) (Q4_0) or d·q + m (Q4_1)
        parts = [f16_bytes(qw.scale), q[..., :16] | (q[..., 16:] << 4)]  # byte j: weights j and j+16
        if kind == "Q4_1":
            parts.insert(1, f16_bytes(_q4_1_minimum(qw).float()))
    elif kind == "Q8_0":
        parts = [f16_bytes(qw.scale), (codes - 128).astype(np.int8).view(np.uint8)]  # (rows, nb, 32): d·q
    else:
        raise ValueError(f"no packer for ggml type {kind!r}")
    return np.concatenate(parts, axis=2).reshape(rows, -1)


def halves_to_pairs(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k (or of their per-row scales / codes) from Hugging Face's rotated halves to the
    interleaved RoPE pairs llama.cpp rotates (the inverse of ``llama2c.rope_pairs_to_halves``)."""
    rows = t.shape[0]  # (n_heads·head_dim, ...): a weight, its codes, or its (rows, groups, 1) scales
    return t.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(t.shape)


def _permute_qweight(qw: QuantizedWeight, n_heads: int) -> QuantizedWeight:
    return QuantizedWeight(codes=halves_to_pairs(qw.codes, n_heads), scale=halves_to_pairs(qw.scale, n_heads),
                           zero_point=halves_to_pairs(qw.zero_point, n_heads), spec=qw.spec,
                           granularity=qw.granularity, dtype=qw.dtype, algorithm=qw.algorithm,
                           scale_dtype=qw.scale_dtype)


def quantized_weight_of(module: nn.Module) -> QuantizedWeight | None:
    """The codes of a quantized layer: a packed layer's (``QuantLinear``), the ``qweight`` that
    ``sq.quantize`` leaves on a fake-quant layer, or None for a float layer."""
    to_qw = getattr(module, "to_quantized_weight", None)
    if callable(to_qw):
        return to_qw()
    qw = getattr(module, "qweight", None)
    return qw if isinstance(qw, QuantizedWeight) else None


# --------------------------------------------------------------------------- tokenizers


def vocab_from_gguf(path: str | Path) -> GGUFVocab:
    """Every ``tokenizer.*`` key of the GGUF file at ``path``, as stored."""
    from gguf import GGUFValueType

    from specquant.models.llama_gguf import open_gguf

    reader = open_gguf(path)
    out = GGUFVocab()
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.fields[key] = (f.contents(), vtype, sub)
    return out


def vocab_from_llama2c(tok) -> GGUFVocab:
    """A llama2.c tokenizer (``models.llama2c.Llama2cTokenizer``) as llama.cpp's "llama" vocabulary:
    ids 0/1/2 are <unk>/<s>/</s>, 3..258 the byte tokens <0x00>..<0xFF>, spaces shown as '▁'."""
    from gguf import GGUFValueType as T
    from gguf import TokenType

    from specquant.models.llama2c import BYTE_OFFSET

    tokens, types = [], []
    for i, piece in enumerate(tok.pieces):
        if i < BYTE_OFFSET:
            tokens.append(["<unk>", "<s>", "</s>"][i])
            types.append(int(TokenType.UNKNOWN if i == 0 else TokenType.CONTROL))
        elif i < BYTE_OFFSET + 256:
            tokens.append(f"<0x{i - BYTE_OFFSET:02X}>")
            types.append(int(TokenType.BYTE))
        else:
            tokens.append(piece.decode("utf-8", errors="replace").replace(" ", SPM_SPACE))
            types.append(int(TokenType.NORMAL))
    return GGUFVocab({
        "tokenizer.ggml.model": ("llama", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": ([float(s) for s in tok.scores], T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.unknown_token_id": (0, T.UINT32, None),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32, None),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL, None),
    })


def vocab_from_tokenizer_json(path: str | Path, vocab_size: int) -> GGUFVocab:
    """A Hugging Face ``tokenizer.json`` with a BPE model as llama.cpp's "gpt2" vocabulary (tokens,
    merges, added tokens as control tokens); ids the model has but the file lacks are padding."""
    from gguf import GGUFValueType as T
    from gguf import TokenType

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: a {model.get('type')!r} tokenizer; GGUF export writes BPE tokenizers only")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for piece, i in model["vocab"].items():
        if not 0 <= int(i) < vocab_size:
            raise ValueError(f"{path}: token {piece!r} has id {i}, outside the model's {vocab_size} embeddings")
        tokens[int(i)], types[int(i)] = piece, int(TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        i = int(added["id"])
        if 0 <= i < vocab_size:
            tokens[i] = added["content"]
            types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    out = {
        "tokenizer.ggml.model": ("gpt2", T.STRING, None),
        "tokenizer.ggml.pre": ("default", T.STRING, None),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
    }
    if merges:
        out["tokenizer.ggml.merges"] = (merges, T.ARRAY, T.STRING)
    return GGUFVocab(out)


# --------------------------------------------------------------------------- the writer


def _llama_core(model: nn.Module):
    """``(config, decoder)`` of a ``transformers`` Llama causal LM; ValueError for anything else."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        kind = getattr(config, "model_type", None) or type(model).__name__
        raise ValueError(f"GGUF export writes Llama-architecture causal LMs (transformers' LlamaForCausalLM); "
                         f"this model is {kind!r}")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            raise ValueError(f"GGUF export: config.{key} is set; biased Llama layers are not supported")
    rope = getattr(config, "rope_scaling", None)
    if rope and (rope.get("rope_type") or rope.get("type")) not in (None, "default"):
        raise ValueError(f"GGUF export: RoPE scaling {rope!r} is not supported")
    return config, model.model


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _float_array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def export_gguf(model: nn.Module, path: str | Path, vocab: GGUFVocab, *, name: str = "specquant",
                float_type: str = "F32") -> ExportResult:
    """Write the quantized Llama causal LM ``model`` to ``path`` as GGUF for llama.cpp.

    ``model`` is what ``sq.quantize`` returned (fake-quant layers with ``.qweight``) or what
    ``sq.load`` built (packed layers).  Each decoder-block Linear is written in the ggml type that
    holds its codes exactly (``gguf_type``) or, when it was left in float, as ``float_type``
    ("F32", exact; or "F16", what llama.cpp's quantizer falls back to for such layers); anything
    else raises ValueError naming the layer, and nothing is written."""
    import gguf

    if float_type not in ("F32", "F16"):
        raise ValueError(f"float_type must be 'F32' or 'F16', got {float_type!r}")

    config, core = _llama_core(model)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
    tensors: list[tuple[str, np.ndarray, str]] = []  # (gguf name, data, ggml type)

    def add_linear(gname: str, hf_name: str, module: nn.Module, n_heads: int | None) -> None:
        aq = getattr(module, "input_quant", None) or getattr(module, "act_quant", None)
        if aq is not None:
            raise ValueError(f"layer '{hf_name}': quantizes its input activations ({aq.bits}-bit), which GGUF "
                             f"does not hold; export a weight-only run")
        qw = quantized_weight_of(module)
        kind = gguf_type(qw, hf_name)
        if kind == "F32":
            w = module.weight.detach().float()  # (out, in)
            w = _float_array(halves_to_pairs(w, n_heads) if n_heads else w)
            tensors.append((gname, w.astype(np.float16) if float_type == "F16" else w, float_type))
            return
        if n_heads:
            qw = _permute_qweight(qw, n_heads)
        tensors.append((gname, pack_block_codes(qw, kind), kind))

    modules = dict(model.named_modules())
    for gname, hf in TOP_TENSORS.items():
        if gname == "output":
            continue
        module = modules[hf]
        if quantized_weight_of(module) is not None:
            raise ValueError(f"layer '{hf}': GGUF export keeps {hf} in float; it was quantized")
        tensors.append((f"{gname}.weight", _float_array(module.weight), "F32"))
    tied = model.lm_head.weight is core.embed_tokens.weight or bool(getattr(config, "tie_word_embeddings", False))
    if not tied:
        add_linear("output.weight", "lm_head", model.lm_head, None)
    for i in range(len(core.layers)):
        for gname, hf in BLOCK_TENSORS.items():
            full = f"model.layers.{i}.{hf}"
            module = modules[full]
            if hasattr(module, "in_features"):  # nn.Linear or a packed QuantLinear
                n = heads if gname == "attn_q" else kv_heads if gname == "attn_k" else None
                if getattr(module, "bias", None) is not None:
                    raise ValueError(f"layer '{full}': has a bias, which the GGUF llama layout does not hold")
                add_linear(f"blk.{i}.{gname}.weight", full, module, n)
            else:  # RMSNorm
                tensors.append((f"blk.{i}.{gname}.weight", _float_array(module.weight), "F32"))

    kinds = Counter(k for _, _, k in tensors if k in GGUF_TYPES)
    if not kinds:
        ftype, label = "F32", "F32"
    else:
        ftype = kinds.most_common(1)[0][0]
        used = sorted(kinds)
        label = used[0] if len(used) == 1 else f"mixed({','.join(used)})"
    head_dim = int(config.hidden_size) // heads

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.WARNING)  # the writer announces each file at INFO; the caller reports it
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_rope_dimension_count(head_dim)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(FILE_TYPES[ftype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(writer)
        expected = 0
        for gname, data, kind in tensors:
            if kind in ("F32", "F16"):
                writer.add_tensor(gname, data)
            else:
                writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[kind])
            expected += data.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        gguf_log.setLevel(level)
    notes = [f"{g}: {k} (not quantized)" for g, _, k in tensors if k in ("F32", "F16")
             and not g.endswith("norm.weight") and not g.startswith("token_embd")]
    return ExportResult(file=str(path), bytes=path.stat().st_size, format="gguf", type=label,
                        tensors={g: k for g, _, k in tensors}, expected_bytes=expected, notes=notes)


# --------------------------------------------------------------------------- helpers for callers


def gguf_float_layers(model: nn.Module) -> dict[str, str]:
    """Linear layers that no GGUF block type can hold (input width not a multiple of 32), each with
    the reason: quantizing on a GGUF grid leaves them in float (llama.cpp cannot block them either)."""
    return {name: f"input width {m.in_features} is not a multiple of the GGUF block {GGUF_BLOCK}"
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.in_features % GGUF_BLOCK}


def vocab_for_entry(entry, vocab_size: int, data_dir=None) -> GGUFVocab:
    """The tokenizer of a zoo / folder entry as GGUF metadata: the ``tokenizer.*`` keys of the GGUF
    it came from (``extra["gguf_file"]``), a llama2.c vocabulary (``extra["tokenizer"]``), or the
    ``tokenizer.json`` of its Hugging Face folder (``extra["hf_folder"]``)."""
    from specquant.models.llama2c import Llama2cTokenizer

    extra = entry.extra or {}
    if callable(extra.get("gguf_file")):
        return vocab_from_gguf(extra["gguf_file"]())
    if extra.get("hf_folder"):
        return vocab_from_tokenizer_json(Path(extra["hf_folder"]) / "tokenizer.json", vocab_size)
    tok = extra["tokenizer"](data_dir) if callable(extra.get("tokenizer")) else None
    if isinstance(tok, Llama2cTokenizer):
        return vocab_from_llama2c(tok)
    raise ValueError(f"model {entry.id!r}: no tokenizer that GGUF export can write is known for it")
