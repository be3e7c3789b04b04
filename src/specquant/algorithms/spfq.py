"""SPFQ: stochastic path-following quantization with data alignment.

Reference: Zhang & Saab, "SPFQ: A Stochastic Algorithm and Its Error Analysis for Neural
Network Quantization", arXiv 2309.10975 (2023).

Phase 1, data alignment, finds continuous weights w̃ with X̃w̃ ≈ Xw:
  * order r: r − 1 Gauss–Seidel sweeps on min ‖Xw − X̃w̃‖² (the first is the continuous
    path-following pass, the next ones continue from its residual); r = 1 is plain path following;
  * perfect alignment: min ‖w̃‖_∞ subject to X̃w̃ = Xw, a linear program (SciPy HiGHS), for
    layers where that system is solvable.
Phase 2 quantizes along the same path with the unbiased stochastic quantizer
(E[Q(z)] = z), starting from the alignment residual.  Steps are static, chosen from the aligned
weights before phase 2 (groups of the original column order, as in ``algorithms.gpfq``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, context, register_method
from specquant.algorithms.common import (
    choose_scales,
    column_order,
    per_column,
    row_output_error,
    to_quantized_weight,
)
from specquant.algorithms.gpfq import path_follow
from specquant.core.grid import GridSpec
from specquant.core.rounding import make_generator


@dataclass
class SPFQConfig(QuantConfig):
    """Stochastic path-following quantization."""

    order: int = 1  # r: data alignment of order r (r − 1 Gauss–Seidel sweeps before quantizing)
    perfect_alignment: bool = False  # solve min ‖w̃‖_∞ s.t. X̃w̃ = Xw by LP (small layers only)
    rounding: str = "stochastic"  # "stochastic" (SPFQ) or "nearest" (then order r ≥ 2 is aligned GPFQ)
    scale_rule: str = "output-mse"  # step size rule, as in GPFQConfig
    c_alpha: float = 1.16  # the constant C of the "authors" step rule
    act_order: bool = True  # process inputs by decreasing ‖X̃_t‖
    block_size: int = 128  # columns per lazy batch of updates

    method = "spfq"
    needs_data = True


def alignment_error(W, W_tilde, stats: LayerStats) -> torch.Tensor:
    """‖X w_i − X̃ w̃_i‖² per row."""
    return row_output_error(W, W_tilde, stats.H, stats.G, stats.target_energy(W))


def align(W: torch.Tensor, stats: LayerStats, order_r: int, col_order: torch.Tensor,
          block_size: int = 128) -> torch.Tensor:
    """Continuous weights W̃ (out, N0) after r − 1 alignment sweeps (W itself when r = 1)."""
    if order_r < 1:
        raise ValueError(f"alignment order r must be >= 1, got {order_r}")
    W = W.double()
    if order_r == 1:
        return W
    n = W.shape[1]
    dummy = torch.ones(W.shape, dtype=torch.float64, device=W.device)
    zero = torch.zeros(W.shape, dtype=torch.float64, device=W.device)
    spec = GridSpec(8, "narrow")  # unused by continuous passes
    Wt = path_follow(W, stats.H, stats.G, dummy, zero, spec, col_order, block_size=block_size, quantize=False)
    for _ in range(order_r - 2):
        V0 = W @ stats.G.double().T - Wt @ stats.H.double().T  # (out, N0): X̃ᵀ(Xw − X̃w̃) per row
        # Sweep on the residual: the target is w̃ itself with X̃ on both sides, started from V0.
        Wt = path_follow(Wt, stats.H, stats.H, dummy, zero, spec, col_order, block_size=block_size,
                         V0=V0, quantize=False)
    assert Wt.shape[1] == n
    return Wt


def perfect_alignment(W: torch.Tensor, stats: LayerStats, layer: str = "layer", tol: float = 1e-6) -> torch.Tensor:
    """min ‖w̃‖_∞ subject to X̃w̃ = Xw, per row, by linear programming (SciPy HiGHS).

    In the covariance form the constraint is Hw̃ = Gw (the normal equations), which has the
    same solutions as X̃w̃ = Xw exactly when the latter is solvable; that is checked first
    and a ValueError names the layer when it is not.
    """
    from scipy.optimize import linprog  # here: scipy.optimize is slow to import, and only this LP needs it

    H = stats.H.double()
    G = stats.G.double()
    W = W.double()
    Hp = torch.linalg.pinv(H, hermitian=True)
    W_ls = (Hp @ (G @ W.T)).T  # least-squares solutions (out, N0)
    res = alignment_error(W, W_ls, stats)
    ref = (W @ stats.F.double() * W).sum(1).clamp_min(1e-300)
    worst = float((res / ref).max())
    if worst > tol:
        raise ValueError(
            f"perfect data alignment is infeasible for layer '{layer}': X̃w̃ = Xw has no solution "
            f"(relative residual {worst:.2e} > {tol:g}; {stats.n_rows} rows vs {stats.dim} inputs); "
            "use alignment order r instead"
        )
    n = H.shape[0]
    Hn = H.numpy()
    out = torch.empty_like(W)
    c = np.zeros(n + 1)
    c[-1] = 1.0
    eye = np.eye(n)
    A_ub = np.block([[eye, -np.ones((n, 1))], [-eye, -np.ones((n, 1))]])
    b_ub = np.zeros(2 * n)
    A_eq = np.hstack([Hn, np.zeros((n, 1))])
    for i in range(W.shape[0]):
        b_eq = (G @ W[i]).numpy()
        r = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(None, None)] * (n + 1),
                    method="highs")
        if r.status != 0:
            raise ValueError(f"perfect data alignment LP failed for layer '{layer}', row {i}: {r.message}")
        out[i] = torch.from_numpy(r.x[:n])
    return out


def quantize_weight(W: torch.Tensor, stats: LayerStats, config: SPFQConfig, ctx: QuantContext | None = None):
    """SPFQ on one layer: ``W`` (out, N0) and its statistics → QuantizedWeight.  Pure function:
    the random rounding is drawn from ``ctx.seed``; ``ctx.layer`` names the layer in errors."""
    ctx = context(ctx, config)
    spec = config.grid_spec()
    gran = config.granularity
    col_order = column_order(stats.H, config.act_order)
    if config.perfect_alignment:
        Wt = perfect_alignment(W, stats, ctx.layer)
    else:
        Wt = align(W, stats, config.order, col_order, config.block_size)
    scale, zp = choose_scales(Wt.float(), spec, gran, config.scale_rule, stats.H, config.c_alpha,
                              store=config.scale_dtype)
    S = per_column(scale, gran, tuple(W.shape))
    Z = per_column(zp, gran, tuple(W.shape))
    gen = make_generator(ctx.seed)
    if config.perfect_alignment or config.order > 1:
        V0 = W.double() @ stats.G.double().T - Wt @ stats.H.double().T  # alignment residual X̃ᵀ(Xw − X̃w̃)
        W_hat = path_follow(Wt, stats.H, stats.H, S, Z, spec, col_order, config.rounding, gen,
                            config.block_size, V0=V0)
    else:
        W_hat = path_follow(W, stats.H, stats.G, S, Z, spec, col_order, config.rounding, gen, config.block_size)
    info = {"order": config.order, "perfect_alignment": config.perfect_alignment, "rounding": config.rounding,
            "scale_rule": config.scale_rule}
    return to_quantized_weight(W_hat, scale, zp, spec, gran, "spfq", info, W.dtype, config.scale_dtype)


register_method("spfq", SPFQConfig, quantize_weight, "stochastic path following with data alignment (Zhang & Saab)")
