"""llama.cpp itself, through ``llama-cpp-python`` (built from its source distribution by the
project's set-up): run a GGUF file, and llama.cpp's own quantizer (the library call behind
``llama-quantize``).  Used to check and measure GGUF exports against the runtime users run;
nothing here reads a GGUF by itself.

``LlamaCppModel(path)(x)`` returns llama.cpp's logits (B, T, vocab) for token ids (B, T), so
specquant's perplexity protocol (``eval.perplexity``) runs on llama.cpp's forward pass unchanged.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LLAMA_CPP_INSTALL = "pip install 'specquant[runtimes]' (llama-cpp-python, built from source)"
QUANT_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama_ftype of llama.cpp's quantizer
GGML_F32 = 0  # ggml type id of float32 (embeddings and output kept in float)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"llama.cpp is not installed ({e}); {LLAMA_CPP_INSTALL}") from None
    return llama_cpp


def _threads(threads: int | None) -> int:
    return int(threads) if threads else max(1, torch.get_num_threads())


@dataclass(frozen=True)
class SpeedResult:
    """llama.cpp's speed on one file: prompt processing and token-by-token generation."""

    prompt_tokens: int  # tokens in the prompt, evaluated as one batch
    prompt_tokens_per_s: float  # prompt tokens / seconds
    gen_tokens: int  # tokens generated one at a time after the prompt
    gen_tokens_per_s: float  # generated tokens / seconds


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp (CPU), giving the logits of every position."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, n_batch: int = 512):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        llama_cpp = _llama_cpp()
        self.n_ctx = int(n_ctx)
        threads = _threads(threads)
        try:
            self._llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_batch=min(n_batch, self.n_ctx),
                                        n_threads=threads, n_threads_batch=threads, logits_all=True,
                                        verbose=False, seed=0)
        except ValueError as e:
            raise ValueError(f"{path}: llama.cpp could not load it ({e})") from None
        self.vocab_size = int(self._llm.n_vocab())

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of one sequence, evaluated from an empty context."""
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"a sequence of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        self._llm.reset()
        self._llm.eval(list(map(int, ids)))
        return np.array(self._llm.scores[:len(ids)], dtype=np.float32)  # (T, vocab)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T), one sequence at a time."""
        return torch.from_numpy(np.stack([self.logits(row.tolist()) for row in x]))

    def speed(self, prompt: list[int], gen_tokens: int) -> SpeedResult:
        """Time the prompt (one batch) and then ``gen_tokens`` greedy tokens, one per call."""
        self._llm.reset()
        t0 = time.perf_counter()
        self._llm.eval(list(map(int, prompt)))
        t_prompt = time.perf_counter() - t0
        nxt = int(np.argmax(self._llm.scores[len(prompt) - 1]))
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            self._llm.eval([nxt])
            nxt = int(np.argmax(self._llm.scores[self._llm.n_tokens - 1]))
        t_gen = time.perf_counter() - t0
        return SpeedResult(len(prompt), len(prompt) / t_prompt, gen_tokens, gen_tokens / t_gen)

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llama_quantize(src: str | Path, dst: str | Path, kind: str, threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (what ``llama-quantize SRC DST TYPE`` runs) on a float GGUF, with
    the token embeddings and the output matrix kept in float32 as in specquant's protocol."""
    llama_cpp = _llama_cpp()
    if kind not in QUANT_FTYPES:
        raise ValueError(f"llama_quantize: type {kind!r} not one of {', '.join(QUANT_FTYPES)}")
    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = _threads(threads)
    params.ftype = QUANT_FTYPES[kind]
    params.token_embedding_type = GGML_F32
    params.output_tensor_type = GGML_F32
    tmp = dst.with_name(f".{dst.name}.tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ValueError(f"llama.cpp's quantizer failed on {src} (type {kind}, return code {rc})")
    tmp.replace(dst)
    return dst
