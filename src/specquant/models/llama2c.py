"""llama2.c checkpoints and tokenizers (the TinyStories ``stories260K`` model), as Hugging Face Llama.

Checkpoint (``stories260K.bin``, Karpathy's llama2.c "version 0" format): seven int32 —
dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (a negative vocab_size means
an unshared classifier follows) — then float32 arrays: token embedding (vocab, dim), attention
RMSNorm weights (L, dim), wq (L, dim, dim), wk (L, kv_dim, dim), wv (L, kv_dim, dim),
wo (L, dim, dim), FFN RMSNorm weights (L, dim), w1 (L, hidden, dim), w2 (L, dim, hidden),
w3 (L, hidden, dim), final RMSNorm (dim,), the RoPE table (seq_len, head_dim/2, twice; unused) and
the classifier (vocab, dim) when unshared.  The model is built as ``transformers``'
``LlamaForCausalLM`` (w1 = gate_proj, w3 = up_proj, w2 = down_proj).  llama2.c rotates
interleaved pairs (x₀, x₁), (x₂, x₃), … while Hugging Face rotates the two halves of each head,
so wq and wk rows are permuted per head (as the Hugging Face conversion scripts do); the
outputs are the same.

Tokenizer (``tok512.bin``): int32 max_token_length, then per token a float32 merge score, an
int32 length and the UTF-8 bytes.  Ids 0, 1, 2 are <unk>, <s> (BOS), </s>; ids 3…258 are the
raw bytes <0x00>…<0xFF>.  Encoding (llama2.c's ``encode``): a leading space is added, each
character becomes its piece (or its UTF-8 bytes as byte tokens), then the adjacent pair whose
merged piece has the highest score is merged until none can be.

Every read is checked: a truncated or inconsistent file is a one-line ValueError naming it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # id of the byte token <0x00>


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven int32 of a llama2.c checkpoint."""

    dim: int  # model width
    hidden_dim: int  # FFN width
    n_layers: int  # decoder blocks
    n_heads: int  # attention heads
    n_kv_heads: int  # key/value heads (grouped-query attention)
    vocab_size: int  # tokens (absolute value; the sign says whether the classifier is shared)
    seq_len: int  # context length
    shared_classifier: bool  # the classifier is the token embedding


def _read_header(path: Path, raw: bytes) -> Llama2cHeader:
    if len(raw) < 28:
        raise ValueError(f"{path}: not a llama2.c checkpoint (only {len(raw)} bytes)")
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("<7i", raw[:28])
    if min(dim, hidden, layers, heads, kv, seq) < 1 or vocab == 0 or dim % heads or heads % kv or (dim // heads) % 2:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {dim, hidden, layers, heads, kv, vocab, seq})")
    return Llama2cHeader(dim, hidden, layers, heads, kv, abs(vocab), seq, vocab > 0)


def rope_pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from interleaved RoPE pairs (llama2.c, GGUF) to Hugging Face's rotated halves."""
    rows, cols = w.shape  # (n_heads·head_dim, dim)
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c(path: str | Path):
    """The llama2.c checkpoint at ``path`` as a ``LlamaForCausalLM`` in eval mode (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # slow to import: loaded when a model is

    path = Path(path)
    raw = path.read_bytes()
    h = _read_header(path, raw)
    head_dim = h.dim // h.n_heads
    kv_dim = h.n_kv_heads * head_dim
    L = h.n_layers
    shapes = [("emb", (h.vocab_size, h.dim)), ("att_norm", (L, h.dim)), ("wq", (L, h.dim, h.dim)),
              ("wk", (L, kv_dim, h.dim)), ("wv", (L, kv_dim, h.dim)), ("wo", (L, h.dim, h.dim)),
              ("ffn_norm", (L, h.dim)), ("w1", (L, h.hidden_dim, h.dim)), ("w2", (L, h.dim, h.hidden_dim)),
              ("w3", (L, h.hidden_dim, h.dim)), ("norm", (h.dim,)), ("freq", (2, h.seq_len, head_dim // 2))]
    if not h.shared_classifier:
        shapes.append(("cls", (h.vocab_size, h.dim)))
    need = sum(int(np.prod(s)) for _, s in shapes)
    floats = (len(raw) - 28) // 4
    if floats != need or (len(raw) - 28) % 4:
        raise ValueError(f"{path}: llama2.c checkpoint holds {floats} floats, its header needs {need}")
    data = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).copy())
    arrays, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = data[at:at + n].reshape(shape)
        at += n
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{path}: the checkpoint holds NaN or infinite weights")
    config = LlamaConfig(
        vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim, num_hidden_layers=L,
        num_attention_heads=h.n_heads, num_key_value_heads=h.n_kv_heads, max_position_embeddings=h.seq_len,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=h.shared_classifier,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": arrays["emb"], "model.norm.weight": arrays["norm"]}
    for i in range(L):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": arrays["att_norm"][i],
            p + "post_attention_layernorm.weight": arrays["ffn_norm"][i],
            p + "self_attn.q_proj.weight": rope_pairs_to_halves(arrays["wq"][i], h.n_heads),
            p + "self_attn.k_proj.weight": rope_pairs_to_halves(arrays["wk"][i], h.n_kv_heads),
            p + "self_attn.v_proj.weight": arrays["wv"][i],
            p + "self_attn.o_proj.weight": arrays["wo"][i],
            p + "mlp.gate_proj.weight": arrays["w1"][i],
            p + "mlp.down_proj.weight": arrays["w2"][i],
            p + "mlp.up_proj.weight": arrays["w3"][i],
        })
    state["lm_head.weight"] = arrays["emb"] if h.shared_classifier else arrays["cls"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (h.shared_classifier and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint and Llama architecture disagree (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if h.shared_classifier:
        model.tie_weights()
    return model.eval()


class Llama2cTokenizer:
    """llama2.c's sentencepiece-style tokenizer: score-driven pair merges over a small vocabulary."""

    def __init__(self, path: str | Path):
        path = Path(path)
        raw = path.read_bytes()
        if len(raw) < 4:
            raise ValueError(f"{path}: not a llama2.c tokenizer (only {len(raw)} bytes)")
        self.max_token_length = struct.unpack("<i", raw[:4])[0]
        pieces, scores, at = [], [], 4
        while at < len(raw):
            if at + 8 > len(raw):
                raise ValueError(f"{path}: truncated tokenizer file (entry {len(pieces)})")
            score, n = struct.unpack("<fi", raw[at:at + 8])
            if n < 0 or at + 8 + n > len(raw):
                raise ValueError(f"{path}: truncated or corrupted tokenizer file (entry {len(pieces)})")
            pieces.append(raw[at + 8:at + 8 + n])
            scores.append(score)
            at += 8 + n
        if len(pieces) < BYTE_OFFSET + 256:
            raise ValueError(f"{path}: tokenizer has {len(pieces)} tokens, fewer than the 259 special and byte tokens")
        self.pieces = pieces  # bytes of each token
        self.scores = scores  # merge score of each token
        self.ids = {p: i for i, p in enumerate(pieces)}  # first id of each piece
        if any(b" " in p[1:] for p in pieces):
            raise ValueError(f"{path}: a token holds a space after its first byte; word-by-word encoding "
                             f"would not match llama2.c's")
        self.path = path
        self._word_cache: dict[str, list[int]] = {}  # word -> its ids (merging is per word)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``: the same ids as llama2.c's ``encode`` (a leading space, one piece per
        character or its UTF-8 byte tokens, best-score pair merges), computed word by word.

        No piece has a space after its first byte, so no merge crosses the start of a word
        (a space): merging each space-led word on its own gives the ids of merging the whole
        text, in time linear in its length (words repeat, and each is merged once).
        """
        ids = [BOS_ID] if bos else []
        if text:
            parts = (" " + text).split(" ")
            cache = self._word_cache
            for i, part in enumerate(parts):
                word = part if i == 0 else " " + part
                if not word:
                    continue
                got = cache.get(word)
                if got is None:
                    got = cache[word] = self._merge(word)
                ids.extend(got)
        if eos:
            ids.append(EOS_ID)
        return ids

    def _merge(self, word: str) -> list[int]:
        """One word's ids: its characters (or UTF-8 byte tokens), then best-score pair merges."""
        toks: list[int] = []
        for ch in word:
            b = ch.encode("utf-8")
            tid = self.ids.get(b)
            if tid is not None:
                toks.append(tid)
            else:
                toks.extend(BYTE_OFFSET + x for x in b)
        while True:
            best, best_i, best_id = -1e30, -1, -1
            for i in range(len(toks) - 1):
                tid = self.ids.get(self.pieces[toks[i]] + self.pieces[toks[i + 1]])
                if tid is not None and self.scores[tid] > best:
                    best, best_i, best_id = self.scores[tid], i, tid
            if best_i < 0:
                return toks
            toks[best_i:best_i + 2] = [best_id]

    def decode(self, ids) -> str:
        """Text of the ids (BOS/EOS dropped, byte tokens joined into UTF-8, the leading space removed)."""
        out = bytearray()
        for tid in ids:
            tid = int(tid)
            if tid in (BOS_ID, EOS_ID) or not 0 <= tid < len(self.pieces):
                continue
            piece = self.pieces[tid]
            if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
                out.extend(bytes([int(piece[3:5], 16)]))
            else:
                out.extend(piece)
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def greedy_generate(model, ids: list[int], n_new: int) -> list[int]:
    """``n_new`` tokens appended to ``ids`` by greedy decoding (argmax, no cache: small models)."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n_new):
            logits = model(torch.tensor([seq])).logits[0, -1]  # (vocab,)
            nxt = int(logits.argmax())
            seq.append(nxt)
            if nxt == EOS_ID:
                break
    return seq
