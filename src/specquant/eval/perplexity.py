"""Perplexity of a causal language model on a token stream, and calibration windows.

Protocol (the usual one for WikiText-2): the whole text is tokenized once (BOS first), cut into
non-overlapping windows of ``seq_len`` tokens from the start (a shorter tail is dropped), each
window is run on its own (no context carried over), and the perplexity is exp of the mean
negative log-likelihood of every token after the first of each window: ``windows × (seq_len −
1)`` predicted tokens.  ``max_windows`` keeps the first windows only, for quick runs; every
result states its windows, window length and token counts.

Calibration windows come from another text (never the test text): ``n`` windows of ``seq_len``
tokens at seeded random offsets.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and the protocol that produced it."""

    perplexity: float  # exp(mean NLL) over the predicted tokens
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # input tokens in the windows (windows × seq_len)
    predicted: int  # tokens scored (windows × (seq_len − 1))
    windows: int  # windows evaluated
    seq_len: int  # tokens per window

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "predicted_tokens": self.predicted, "windows": self.windows, "seq_len": self.seq_len}


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (W, seq_len) of the 1-D token stream ``ids``, from its start."""
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens, got {seq_len}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"the number of evaluation windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).long()


def calibration_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows (n, seq_len) of ``ids`` at random offsets drawn with ``seed``."""
    if ids.dim() != 1 or ids.numel() <= seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, need more than seq_len = {seq_len}")
    if n < 1:
        raise ValueError(f"the number of calibration windows must be at least 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()]).long()


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None, batch_size: int = 4,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``model`` (logits (B, T, vocab) from token ids (B, T)) on the stream ``ids``.

    ``progress(k)`` is called after each batch with the number of windows it held.
    """
    was_training = getattr(model, "training", False)
    if was_training:  # an nn.Module in training mode; a plain callable (a runtime) has no mode
        model.eval()
    windows = token_windows(ids, seq_len, max_windows)  # (W, L)
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    device = next(params, torch.empty(0)).device  # the windows go where the model is (a runtime: CPU)
    total, count = 0.0, 0
    try:
        for s in range(0, windows.shape[0], batch_size):
            x = windows[s:s + batch_size].to(device)  # (b, L)
            logits = _logits(model, x)[:, :-1].float()  # (b, L-1, vocab)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            if not math.isfinite(float(nll)):
                raise ValueError(f"the model's negative log-likelihood is not finite on windows "
                                 f"{s}..{s + x.shape[0] - 1} (NaN or infinite logits)")
            total += float(nll)
            count += x[:, 1:].numel()
            if progress is not None:
                progress(x.shape[0])
    finally:
        if was_training:
            model.train(True)
    mean = total / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=windows.numel(), predicted=count,
                            windows=windows.shape[0], seq_len=seq_len)
