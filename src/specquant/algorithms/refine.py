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

from specquant.core.grid import GridSpec, round_on_grid


def refine_codes(
    W: torch.Tensor,  # (out, N0) target weights, paired with X
    W_hat: torch.Tensor,  # (out, N0) starting point, every entry on the grid of its row
    H: torch.Tensor,  # (N0, N0) X̃ᵀX̃
    G: torch.Tensor,  # (N0, N0) X̃ᵀX
    S: torch.Tensor,  # (out, N0) step per entry
    Z: torch.Tensor,  # (out, N0) zero point per entry
    spec: GridSpec,
    sweeps: int = 1,
    col_order: torch.Tensor | None = None,  # (N0,) visiting order; default natural
    block_size: int = 128,  # columns per lazy batch of residual updates (speed only)
    row_chunk: int = 4096,  # neurons per pass (speed only: rows are independent; keeps blocks in cache)
) -> torch.Tensor:
    """Cyclic coordinate descent on the grid; returns Ŵ' (out, N0) with output error ≤ that of ``W_hat``.

    The residual R = G w − H ŵ is updated lazily: inside a block of columns only the block's
    own columns, and the rest with one (out × B)·(B × N0) product per block, so a sweep costs
    O(out·N0²) in GEMMs instead of N0 passes over the whole residual.  Sweeps stop early when no
    code changes.  Dead inputs (H_tt = 0) are left as they are.
    """
    if sweeps <= 0:
        return W_hat
    if W.shape[0] > row_chunk:
        return torch.cat([
            refine_codes(W[r:r + row_chunk], W_hat[r:r + row_chunk], H, G, S[r:r + row_chunk], Z[r:r + row_chunk],
                         spec, sweeps, col_order, block_size, row_chunk)
            for r in range(0, W.shape[0], row_chunk)
        ])
    n = W.shape[1]
    perm = torch.arange(n, device=W.device) if col_order is None else col_order.to(W.device)
    # Transposed (N0, out) copies in visiting order: coordinate t of every neuron is one contiguous row.
    Hd = H.double()[perm][:, perm]  # (N0, N0)
    Qt = W_hat.double()[:, perm].T.contiguous()  # (N0, out)
    Rt = G.double()[perm][:, perm] @ W.double()[:, perm].T - Hd @ Qt  # (N0, out) residual G w − H ŵ
    d = torch.diagonal(Hd)
    St = S.double()[:, perm].T.contiguous()
    Zt = Z.double()[:, perm].T.contiguous()
    for _ in range(sweeps):
        changed = False
        for i0 in range(0, n, block_size):
            i1 = min(i0 + block_size, n)
            # (B, out) code changes in this block
            D = torch.zeros(i1 - i0, Qt.shape[1], dtype=torch.float64, device=Qt.device)
            for t in range(i0, i1):
                if d[t] <= 0:
                    continue
                z = Qt[t] + Rt[t] / d[t]  # (out,) continuous minimiser along coordinate t
                q = torch.where(St[t] > 0, round_on_grid(z, St[t], Zt[t], spec), Qt[t])  # (out,) (FP8 too)
                delta = q - Qt[t]  # (out,)
                if not bool(delta.any()):
                    continue
                changed = True
                Qt[t] = q
                D[t - i0] = delta
                Rt[i0:i1].addr_(Hd[i0:i1, t], delta, alpha=-1)  # the block's own coordinates now, in place
            if bool(D.any()):  # the other coordinates, in one product each side
                Rt[:i0].addmm_(Hd[:i0, i0:i1], D, alpha=-1)
                Rt[i1:].addmm_(Hd[i1:, i0:i1], D, alpha=-1)
        if not changed:
            break
    return Qt.T[:, torch.argsort(perm)]
