"""GPTQ: one-shot quantization with approximate second-order error feedback.

Reference: Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023.

Minimises ‖X̃Wᵀ − X̃Ŵᵀ‖² column by column: after rounding column t, the error is spread over
the columns not yet quantized through the upper Cholesky factor of H⁻¹ (H = X̃ᵀX̃, damped),
with lazy updates in blocks of ``block_size`` columns.  Inputs that never fire (H_tt = 0) are
dead: their weights are set to 0 and get no error feedback.

Scales are static: chosen from the original weights before the error feedback, one per output
channel, per tensor or per group.  Groups are always the contiguous groups of the *original*
column order (inputs j·G … j·G + G − 1; the last one shorter when G does not divide N0), also
with ``act_order``: the columns are then processed by decreasing H_tt and each one is rounded on
the grid of its own group, whose scale was fixed beforehand.  This is the variant GPTQModel
calls ``static_groups``: the codes and scales are stored in the original order, so the file
needs no permutation (no ``g_idx``) and loads with the plain group layout in every runtime.
The reference implementation instead recomputes a group's scale from the error-updated weights
when the loop reaches the group's first column; in natural order that measured the same as
static scales on correlated test layers (relative output error 0.0742 vs 0.0741, 4-bit g128), and
with ``act_order`` it would make groups follow the processing order, which needs a stored
permutation.

Step search (``search``, per-channel grids only): GPTQ is run once per candidate step of every
output channel — the ``scale_rule`` step times each multiplier, and the max-abs step — all
candidates stacked as extra rows (rows are independent given H, so one Cholesky serves all), and
each channel keeps the candidate with the smallest output error against the float layer,
‖X w − X̃ ŵ‖² (H = X̃ᵀX̃, G = X̃ᵀX), the error the next layers see.  The step that is best for
round-to-nearest ("output-mse") is not the best for GPTQ, whose feedback moves the weights it
still has to round; on ResNet-32 at 2 bits the max-abs step alone beat it by 4 points
(BENCHMARKS.md, "GPTQ against Brevitas' GPTQ on ResNet-32").  Since the unsearched step and the
max-abs step are both candidates, every channel's error is at most that of GPTQ on either grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, context, register_method
from specquant.algorithms.common import choose_scales, column_order, per_column, row_output_error, to_quantized_weight
from specquant.algorithms.refine import refine_codes
from specquant.core.grid import GridSpec, round_on_grid, round_scale


@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ with static scales chosen before the error feedback (static groups with ``act_order``)."""

    damp: float = 0.01  # added to H's diagonal as a fraction of its mean diagonal
    block_size: int = 128  # lazy-batch width in columns
    act_order: bool = True  # quantize columns by decreasing H_tt (activation order); groups stay the original ones
    scale_rule: str = "output-mse"  # step size rule (see algorithms.common.choose_scales)
    refine_sweeps: int = 0  # coordinate-descent sweeps on ‖X̃(w − ŵ)‖ after GPTQ (algorithms.refine); 0 = off
    # Step multipliers tried per output channel besides 1 (the max-abs step is tried too); each channel
    # keeps the candidate with the smallest ‖Xw − X̃ŵ‖ after GPTQ; () = off.  Per-channel grids only.
    search: tuple = (0.8, 0.9, 1.1, 1.25)

    method = "gptq"
    needs_data = True


def error_feedback(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, spec: GridSpec,
                   block_size: int = 128) -> torch.Tensor:
    """GPTQ's sweep on columns already in processing order: round column t, spread its error
    over the later columns through row t of ``U``, the upper Cholesky factor of H⁻¹ (N0, N0)
    (row t of U, scaled by 1/U_tt, is the optimal update of the later columns once the
    earlier ones are fixed), lazily in blocks of ``block_size`` columns.

    W: (out, N0) float64 weights to round, S, Z: (out, N0) step and zero point per entry (a
    step of 0 gives 0).  Returns the quantized (out, N0), in the same column order."""
    W = W.clone()
    n = W.shape[1]
    Q = torch.zeros_like(W)  # (out, N0)
    for i0 in range(0, n, block_size):
        i1 = min(i0 + block_size, n)
        W1 = W[:, i0:i1].clone()  # (out, B)
        E1 = torch.zeros_like(W1)  # (out, B) scaled errors of the block
        U1 = U[i0:i1, i0:i1]  # (B, B)
        for j in range(i1 - i0):
            t = i0 + j
            w = W1[:, j]  # (out,)
            q = round_on_grid(w, S[:, t], Z[:, t], spec)  # (out,) nearest grid value (FP8 grids too)
            Q[:, t] = q
            err = (w - q) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, i1:] -= E1 @ U[i0:i1, i1:]
    return Q


def gptq_core(W: torch.Tensor, H: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, spec: GridSpec,
              col_order: torch.Tensor, damp: float = 0.01, block_size: int = 128, layer: str = "layer") -> torch.Tensor:
    """Quantized Ŵ (out, N0) in the original column order.  S, Z: (out, N0) step and zero point."""
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W = W[:, col_order]
    H = H[col_order][:, col_order]
    S = S.double()[:, col_order]
    Z = Z.double()[:, col_order]
    n = W.shape[1]
    mean_diag = torch.diagonal(H).mean()
    H += damp * mean_diag * torch.eye(n, dtype=torch.float64, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True)  # (N0, N0) upper factor of H⁻¹
    except RuntimeError as e:
        raise ValueError(f"GPTQ: the damped Hessian of layer '{layer}' is not positive definite; "
                         f"raise damp (now {damp}): {str(e).splitlines()[0]}") from None
    Q = error_feedback(W, U, S, Z, spec, block_size)
    inv = torch.argsort(col_order)
    return Q[:, inv]


def static_grid(W: torch.Tensor, H: torch.Tensor, spec: GridSpec, config):
    """The grid fixed before the column loop (GPTQ, Qronos): steps and zero points from the original
    weights by ``config.scale_rule`` in ``config.scale_dtype``, their per-entry (out, N0) expansions,
    and the column order (``config.act_order``).  Returns (scale, zero point, S, Z, col_order)."""
    gran = config.granularity
    scale, zp = choose_scales(W, spec, gran, config.scale_rule, H, store=config.scale_dtype)
    S = per_column(scale, gran, tuple(W.shape))  # (out, N0)
    Z = per_column(zp, gran, tuple(W.shape))  # (out, N0)
    return scale, zp, S, Z, column_order(H, config.act_order)


def quantize_weight(W: torch.Tensor, stats: LayerStats, config: GPTQConfig, ctx: QuantContext | None = None):
    """GPTQ on one layer: ``W`` (out, N0) and its statistics → QuantizedWeight.  Pure function
    (deterministic; ``ctx.layer`` names the layer in errors)."""
    ctx = context(ctx, config)
    spec, gran = config.grid_spec(), config.granularity
    scale, zp, S, Z, col_order = static_grid(W, stats.H, spec, config)
    if config.search and gran.kind == "channel":
        scale, zp, W_hat = _search_steps(W, stats, scale, zp, spec, col_order, config, ctx.layer)
    else:
        W_hat = _gptq_refined(W, stats, S, Z, spec, col_order, config, ctx.layer)
    info = {"damp": config.damp, "act_order": config.act_order, "scale_rule": config.scale_rule,
            "refine_sweeps": config.refine_sweeps}
    if config.search and gran.kind == "channel":  # recorded only when it ran: files without it read as before
        info["search"] = list(config.search)
    return to_quantized_weight(W_hat, scale, zp, spec, gran, "gptq", info, W.dtype, config.scale_dtype)


def _gptq_refined(W, stats, S, Z, spec, col_order, config, layer):
    """GPTQ, then ``config.refine_sweeps`` coordinate-descent sweeps on its own objective."""
    W_hat = gptq_core(W, stats.H, S, Z, spec, col_order, config.damp, config.block_size, layer)
    dead = torch.diagonal(stats.H) == 0
    W_live = torch.where(dead[None, :], torch.zeros_like(W), W)  # GPTQ's target: dead inputs' weights are 0
    return refine_codes(W_live, W_hat, stats.H, stats.H, S, Z, spec, config.refine_sweeps, col_order,
                        config.block_size)


def _search_steps(W, stats, scale, zp, spec, col_order, config, layer):
    """GPTQ once per candidate step (stacked as extra rows), and per output channel the candidate
    with the smallest ‖Xw − X̃ŵ‖².  Returns (scale, zero point, Ŵ) in ``scale``'s shapes."""
    out, n = W.shape
    mults = (1.0,) + tuple(m for m in config.search if m != 1.0)
    steps = [scale.reshape(out, 1).double() * m for m in mults]  # (out, 1) each
    zps = [zp.reshape(out, 1).double()] * len(mults)
    s_max, z_max = choose_scales(W, spec, config.granularity, "minmax", store=config.scale_dtype)
    steps.append(s_max.reshape(out, 1).double())
    zps.append(z_max.reshape(out, 1).double())
    steps = [round_scale(s, config.scale_dtype).double() for s in steps]  # the steps the file will store
    K = len(steps)
    S = torch.cat(steps).expand(K * out, n)  # (K·out, N0)
    Z = torch.cat(zps).expand(K * out, n)
    Wk = W.double().repeat(K, 1)  # (K·out, N0)
    Q = _gptq_refined(Wk, stats, S, Z, spec, col_order, config, layer)
    err = row_output_error(Wk, Q, stats.H, stats.G, None).reshape(K, out)  # up to a per-row constant
    best = err.argmin(0)  # (out,)
    idx = torch.arange(out, device=err.device)
    pick = torch.stack(steps)[best, idx].reshape(scale.shape).float()  # (K, out, 1) → best per row
    pick_z = torch.stack(zps)[best, idx].reshape(zp.shape).float()
    return pick, pick_z, Q.reshape(K, out, n)[best, idx]


register_method("gptq", GPTQConfig, quantize_weight,
                "one-shot quantization with second-order error feedback (GPTQ, Frantar et al.)")
