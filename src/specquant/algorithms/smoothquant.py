"""SmoothQuant's per-input-channel migration scales (pure: tensors in, scales out).

Reference: Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023, section 4 (eq. 4).

A linear layer Y = X Wᵀ (X (m, N0) activations, W (out, N0)) is unchanged by
Y = (X diag(s)⁻¹)(W diag(s))ᵀ for any positive s (N0,).  SmoothQuant chooses

    s_j = max|X_j|^α / max|W_j|^(1−α)

with max|X_j| the largest magnitude of input channel j over the calibration data and max|W_j|
the largest magnitude of column j over the weights of every layer reading that input (the paper
stacks the q/k/v or gate/up weights).  α is the migration strength: α = 1 gives s_j = max|X_j|
(every smoothed channel then peaks at 1: the whole difficulty moves to the weights), α = 0 gives
s_j = 1/max|W_j| (every weight column peaks at 1), α = 0.5 gives both the same peak
sqrt(max|X_j|·max|W_j|).  The engine (``engine/smoothquant.py``) folds 1/s into the module that
produces X and s into the consumers' columns.
"""
from __future__ import annotations

import torch

SQ_EPS = 1e-5  # floor on max|X_j| and max|W_j| before the powers, as the paper's reference code clamps


def smoothquant_scales(act_max: torch.Tensor, Ws: list[torch.Tensor], alpha: float,
                       eps: float = SQ_EPS) -> torch.Tensor:
    """The migration scales s (N0,) float32 for one input shared by the layers ``Ws``.

    Args:
        act_max: (N0,) max |x_j| per input channel over the calibration data, finite and ≥ 0.
        Ws: the weights (out_i, N0) of the layers reading that input (stacked: their column maxima).
        alpha: migration strength in [0, 1].
        eps: floor on both maxima (a dead channel or an all-zero column then gets a finite scale).
    Channels whose activation or weight maximum is 0 keep s_j = 1 (nothing to migrate, and no
    division by 0 in the fold).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant α must be a number in [0, 1], got {alpha!r}")
    if not Ws:
        raise ValueError("SmoothQuant needs at least one weight reading the input")
    n0 = act_max.numel()
    if act_max.dim() != 1:
        raise ValueError(f"act_max must be 1-D (N0,), got shape {tuple(act_max.shape)}")
    for W in Ws:
        if W.dim() != 2 or W.shape[1] != n0:
            raise ValueError(f"weight of shape {tuple(W.shape)} does not read {n0} input channels")
    if not bool(torch.isfinite(act_max).all()) or bool((act_max < 0).any()):
        raise ValueError("act_max must be finite and non-negative")
    a = act_max.double()  # (N0,)
    w = torch.stack([W.detach().abs().amax(dim=0).double().to(a.device) for W in Ws]).amax(dim=0)  # (N0,)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weights hold NaN/inf")
    s = a.clamp_min(eps).pow(alpha) / w.clamp_min(eps).pow(1.0 - alpha)  # (N0,)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.float()
