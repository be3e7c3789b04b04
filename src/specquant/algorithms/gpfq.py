"""GPFQ: greedy path-following quantization.

References: Lybrand & Saab, "A Greedy Algorithm for Quantizing Neural Networks", JMLR 22 (2021);
Zhang, Zhou & Saab, "Post-training Quantization for Neural Networks with Provable Guarantees",
SIAM J. Math. Data Sci. 5 (2023).

For each input index t, all neurons at once:

    q_t = Q( ⟨X̃_t, u_{t−1} + w_t X_t⟩ / ‖X̃_t‖² ),   u_t = u_{t−1} + w_t X_t − q_t X̃_t,

so that u_t = X w_{≤t} − X̃ q_{≤t} is the running output error.  specquant runs it in the
covariance form: it keeps V = X̃ᵀu (one row per neuron), and ⟨X̃_t, u⟩ = V[:, t],
⟨X̃_t, X_t⟩ = G[t, t], ‖X̃_t‖² = H[t, t], with rank-B lazy updates of V (as in GPTQ's lazy
batches).  Cost O(out·N0²) per layer, memory O(N0²), independent of the number of samples.

Steps are chosen from the original weights before the path (per channel, per tensor, or per
group of the original column order, the last group shorter when G does not divide N0); with
``act_order`` the path visits the inputs by decreasing ‖X̃_t‖ and rounds each on its own group's
grid — static groups, as in ``algorithms.gptq``: nothing about the order is stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, register_method
from specquant.algorithms.common import (
    choose_scales,
    column_order,
    per_column,
    row_output_error,
    to_quantized_weight,
)
from specquant.algorithms.refine import refine_codes
from specquant.core.grid import GridSpec, round_on_grid, round_scale


@dataclass
class GPFQConfig(QuantConfig):
    """Greedy path-following quantization."""

    scale_rule: str = "output-mse"  # step: "output-mse", "authors" (C·mean max|w|/2^(b−1)) or a calibrator
    search: tuple = (0.8, 0.9, 1.1, 1.25)  # extra step multipliers per output channel; GPFQ keeps its best; () = off
    c_alpha: float = 1.16  # the constant C of the "authors" step rule
    act_order: bool = True  # process inputs by decreasing ‖X̃_t‖ (else natural order)
    block_size: int = 128  # columns per lazy batch of updates (speed only; results are identical)
    refine_sweeps: int = 2  # coordinate-descent sweeps over the codes after the path (algorithms.refine); 0 = off

    method = "gpfq"
    needs_data = True


def path_follow(
    W: torch.Tensor,  # (out, N0) target weights, paired with X
    H: torch.Tensor,  # (N0, N0) X̃ᵀX̃
    G: torch.Tensor,  # (N0, N0) X̃ᵀX
    S: torch.Tensor,  # (out, N0) step per entry
    Z: torch.Tensor,  # (out, N0) zero point per entry
    spec: GridSpec,
    col_order: torch.Tensor,  # (N0,) processing order
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    block_size: int = 128,
    V0: torch.Tensor | None = None,  # (out, N0) initial X̃ᵀu (SPFQ's aligned start), default 0
    quantize: bool = True,  # False: continuous pass (a Gauss–Seidel sweep), no rounding
    row_chunk: int = 4096,  # neurons per pass (speed only: rows are independent; keeps blocks in cache)
) -> torch.Tensor:
    """One path-following pass; returns Ŵ (out, N0) in the original column order.

    Works on transposed copies (N0, out): the column of every neuron's weights that step t
    reads and writes is then one contiguous row, and runs ``row_chunk`` neurons at a time, so
    that a block of updates stays in cache and the cost stays linear in the number of neurons."""
    if W.shape[0] > row_chunk:
        return torch.cat([
            path_follow(W[r:r + row_chunk], H, G, S[r:r + row_chunk], Z[r:r + row_chunk], spec, col_order, rounding,
                        generator, block_size, None if V0 is None else V0[r:r + row_chunk], quantize, row_chunk)
            for r in range(0, W.shape[0], row_chunk)
        ])
    Wt = W.double()[:, col_order].T.contiguous()  # (N0, out)
    H = H.double()[col_order][:, col_order]
    G = G.double()[col_order][:, col_order]
    St = S.double()[:, col_order].T.contiguous()  # (N0, out)
    Zt = Z.double()[:, col_order].T.contiguous()  # (N0, out)
    n, out = Wt.shape
    V = (torch.zeros(n, out, dtype=torch.float64, device=Wt.device) if V0 is None
         else V0.double()[:, col_order].T.contiguous())
    Q = torch.zeros(n, out, dtype=torch.float64, device=Wt.device)  # (N0, out)
    d = torch.diagonal(H).clone()
    g = torch.diagonal(G).clone()
    for i0 in range(0, n, block_size):
        i1 = min(i0 + block_size, n)
        for t in range(i0, i1):
            if d[t] > 0:
                z = (V[t] + Wt[t] * g[t]) / d[t]  # (out,)
            else:  # dead input: X̃_t = 0, any value gives the same output; take w_t itself
                z = Wt[t]
            if quantize:
                q = round_on_grid(z, St[t], Zt[t], spec, rounding, generator)  # (out,) on the grid (FP8 too)
            else:
                q = z
            Q[t] = q
            if t + 1 < i1:  # in-place rank-1 updates: no (B, out) temporaries per step
                V[t + 1:i1].addr_(G[t + 1:i1, t], Wt[t]).addr_(H[t + 1:i1, t], q, alpha=-1)
        if i1 < n:
            V[i1:].addmm_(G[i1:, i0:i1], Wt[i0:i1]).addmm_(H[i1:, i0:i1], Q[i0:i1], alpha=-1)
    inv = torch.argsort(col_order)
    return Q.T[:, inv]


def quantize_weight(W: torch.Tensor, stats: LayerStats, config: GPFQConfig, ctx: QuantContext | None = None):
    """GPFQ on one layer: ``W`` (out, N0) and its input statistics → QuantizedWeight.  Pure function
    (deterministic: ``ctx`` is not used)."""
    spec = config.grid_spec()
    gran = config.granularity
    scale, zp = choose_scales(W, spec, gran, config.scale_rule, stats.H, config.c_alpha, store=config.scale_dtype)
    S = per_column(scale, gran, tuple(W.shape))
    Z = per_column(zp, gran, tuple(W.shape))
    col_order = column_order(stats.H, config.act_order)
    if config.search and gran.kind == "channel":
        scale, zp, W_hat = _search_steps(W, stats, scale, zp, spec, col_order, config)
    else:
        W_hat = path_follow(W, stats.H, stats.G, S, Z, spec, col_order, block_size=config.block_size)
        W_hat = refine_codes(W, W_hat, stats.H, stats.G, S, Z, spec, config.refine_sweeps, col_order, config.block_size)
    info = {"scale_rule": config.scale_rule, "act_order": config.act_order, "search": list(config.search),
            "refine_sweeps": config.refine_sweeps}
    return to_quantized_weight(W_hat, scale, zp, spec, gran, "gpfq", info, W.dtype, config.scale_dtype)


def _search_steps(W, stats, scale, zp, spec, col_order, config):
    """Run the path once per step multiplier (all candidates stacked as extra rows, since rows
    are independent) and keep, per output channel, the step with the smallest output error."""
    mults = (1.0,) + tuple(m for m in config.search if m != 1.0)
    K, (out, n) = len(mults), W.shape
    s0 = scale.reshape(out, 1).double()
    cands = [s0 * m for m in mults]  # K × (out, 1) candidate steps
    fp16 = config.scale_dtype != "float32"
    if fp16:  # candidates the file can store: the path runs with the steps that will be saved
        cands = [round_scale(c, config.scale_dtype).double() for c in cands]
    Ss = torch.cat(cands).expand(K * out, n)  # (K·out, N0)
    Zs = zp.reshape(out, 1).double().repeat(K, 1).expand(K * out, n)
    Wk = W.double().repeat(K, 1)  # (K·out, N0)
    Q = path_follow(Wk, stats.H, stats.G, Ss, Zs, spec, col_order, block_size=config.block_size)
    Q = refine_codes(Wk, Q, stats.H, stats.G, Ss, Zs, spec, config.refine_sweeps, col_order, config.block_size)
    err = row_output_error(Wk, Q, stats.H, stats.G, None).reshape(K, out)  # (K, out), up to a per-row constant
    best = err.argmin(0)  # (out,)
    idx = torch.arange(out, device=Q.device)
    W_hat = Q.reshape(K, out, n)[best, idx]
    if fp16:
        return torch.stack(cands)[best, idx].reshape(scale.shape).float(), zp, W_hat  # (K, out, 1) → best per row
    m = torch.tensor(mults, dtype=torch.float64, device=best.device)[best].reshape(scale.shape)
    return (scale.double() * m).float(), zp, W_hat


register_method("gpfq", GPFQConfig, quantize_weight, "greedy path following (Lybrand & Saab)")
