"""Rounding to integers: nearest (ties to even) and unbiased stochastic rounding.

Stochastic rounding (Gupta et al., "Deep learning with limited numerical precision", 2015)
rounds t up with probability t - floor(t), so that E[round(t)] = t and the variance of the
error is (t - ⌊t⌋)(⌈t⌉ - t) ≤ 1/4 (in units of the grid step).
"""
from __future__ import annotations

import torch

ROUNDING_MODES = ("nearest", "stochastic")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (0 when None, so runs are reproducible)."""
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def round_values(t: torch.Tensor, mode: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """Round each entry of ``t`` to an integer (returned as floats)."""
    if mode == "nearest":
        return torch.round(t)
    if mode == "stochastic":
        if generator is None:
            generator = make_generator(None)
        # drawn by the (CPU) generator, then moved: the same seed gives the same codes on any device
        u = torch.rand(t.shape, generator=generator, dtype=t.dtype).to(t.device)
        return torch.floor(t + u)
    raise ValueError(f"unknown rounding {mode!r}; allowed: {', '.join(ROUNDING_MODES)}")
