"""Greedy coordinate refinement of quantized weights against the layer's output error.

After a path-following pass (GPFQ, SPFQ) or GPTQ has put every weight on the grid, each code
can still be revisited with all the others fixed.  For one row w (target, paired with X) and
its quantized ŵ (paired with X̃) the objective is

    f(ŵ) = ‖X w − X̃ ŵ‖² = ŵᵀHŵ − 2 ŵᵀ(G w) + const,     H = X̃ᵀX̃,  G = X̃ᵀX,

a quadratic whose restriction to coordinate t is minimised, over the real line, at
ŵ_t + r_t / H_tt with r = G w − H ŵ.  The best grid value for that coordinate is the nearest
grid point to this minimiser (the 1-D quadratic is symmetric about it), so each update can
only lower f: a sweep over all coordinates is monotone, and repeated sweeps converge to a
coordinate-wise optimum on the grid.  GPFQ's own step for coordinate t is exactly this update
made once, in path order, with the later coordinates still at their float values; the
refinement corrects the early choices once the later ones are known.

Coordinate-wise minimisation of the layer reconstruction error is the idea of A. Zhang, Z. Yang,
N. Wang, Y. Qi, J. Xin, X. Li & P. Yin, "COMQ: A Backpropagation-Free Algorithm for Post-Training
Quantization" (arXiv 2403.07134, 2024), which starts from round-to-nearest and also updates the
scales; here it only polishes the codes of an already data-aware solution, against GPFQ's target
X w (not X̃ w), in the covariance form (O(out·N0²) per sweep, memory O(N0²)), for any specquant
grid with per-entry steps and zero points.
"""
from __future__ import annotations

import torch

from specquant.core.grid import GridSpec


def refine_codes(
    W: torch.Tensor,  # (out, N0) target weights, paired with X
    W_hat: torch.Tensor,  # (out, N0) starting point, every entry on the grid of its row
    H: torch.Tensor,  # (N0, N0) X̃ᵀX̃
    G: torch.Tensor,  # (N0, N0) X̃ᵀX
    S: torch.Tensor,  # (out, N0) step per entry
    Z: torch.Tensor,  # (out, N0) zero point per entry
    spec: GridSpec,
    sweeps: int = 1,
    order: torch.Tensor | None = None,  # (N0,) visiting order; default natural
) -> torch.Tensor:
    """Cyclic coordinate descent on the grid; returns Ŵ' (out, N0) with output error ≤ that of ``W_hat``.

    A sweep stops early when no code changes.  Dead inputs (H_tt = 0) are left as they are.
    """
    if sweeps <= 0:
        return W_hat
    Hd = H.double()
    Q = W_hat.double().clone()  # (out, N0)
    R = W.double() @ G.double().T - Q @ Hd  # (out, N0) residual G w − H ŵ, one row per neuron
    d = torch.diagonal(Hd)
    Sd, Zd = S.double(), Z.double()
    safe_S = torch.where(Sd > 0, Sd, torch.ones_like(Sd))
    cols = torch.arange(W.shape[1]) if order is None else order
    for _ in range(sweeps):
        changed = False
        for t in cols.tolist():
            if d[t] <= 0:
                continue
            z = Q[:, t] + R[:, t] / d[t]  # (out,) continuous minimiser along coordinate t
            c = torch.round(z / safe_S[:, t] + Zd[:, t]).clamp(spec.qmin, spec.qmax)
            q = torch.where(Sd[:, t] > 0, (c - Zd[:, t]) * Sd[:, t], Q[:, t])
            delta = q - Q[:, t]  # (out,)
            if not bool(delta.any()):
                continue
            changed = True
            Q[:, t] = q
            R -= delta[:, None] * Hd[t][None, :]  # rank-1 update of G w − H ŵ
        if not changed:
            break
    return Q
