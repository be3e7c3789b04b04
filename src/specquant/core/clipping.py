"""Range calibration (clipping): choose the range of each block of values.

All calibrators act on a (B, n) matrix whose rows are blocks sharing one scale and return
``(lo, hi)``, each (B,).  Symmetric grids use ``alpha = max(|lo|, |hi|)``.
"""
from __future__ import annotations

import torch

from specquant.core.grid import GridSpec

CLIPPING_METHODS = ("minmax", "percentile", "mse", "aciq-gauss", "aciq-laplace", "kl")


def check_clipping(method: str) -> str:
    if method not in CLIPPING_METHODS:
        raise ValueError(f"unknown clipping {method!r}; allowed: {', '.join(CLIPPING_METHODS)}")
    return method


def calibrate(rows: torch.Tensor, method: str, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Range (lo, hi) per row of ``rows`` (B, n) for the grid ``spec``."""
    check_clipping(method)
    lo = rows.amin(dim=1).clamp_max(0)  # (B,)
    hi = rows.amax(dim=1).clamp_min(0)  # (B,)
    if method == "minmax":
        return lo, hi
    raise NotImplementedError(method)
