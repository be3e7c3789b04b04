"""Qronos: sequential rounding that corrects the error carried in from earlier layers.

Reference: S. Zhang, H. Zhang, I. Colbert & R. Saab, "Qronos: Correcting the Past by Shaping the
Future... in Post-Training Quantization", arXiv:2505.11695 (2025).  The authors' implementation
is ``brevitas.graph.qronos`` (Brevitas 0.13).

Like GPFQ, and unlike GPTQ, Qronos aims at the float model's output X w from the inputs X̃ of the
partly quantized model: per neuron it minimises ‖X w − X̃ q‖² over grid vectors q, one input
column at a time (in processing order), alternating two exact least-squares steps.  With the
later columns held at their current values v (v = w at the start), step t is

    correct the past:  q_t = Q(argmin_p ‖X w − Σ_{j<t} q_j X̃_j − p X̃_t − Σ_{j>t} v_j X̃_j‖²)
    shape the future:  v_{>t} = argmin_u ‖X w − Σ_{j≤t} q_j X̃_j − X̃_{>t} u‖² + λ‖w_{>t} − u‖².

From step 2 on, v_{≥t} already solves the least-squares problem over the columns ≥ t, so the
correction's argmin is v_t itself, and the new future is
v_{>t} + (v_t − q_t)·(H_{>t,>t} + λI)⁻¹ H_{>t,t}: GPTQ's update with the damped H = X̃ᵀX̃, carried out
by the upper Cholesky factor of (H_{>1,>1} + λI)⁻¹ with lazy blocks.  In the covariance form
(H = X̃ᵀX̃, G = X̃ᵀX; X itself is never needed) the algorithm is therefore

    1. p_1 = ((G w)_1 − Σ_{j>1} H_1j w_j) / H_11,   q_1 = Q(p_1);
    2. v_{>1} = (H_{>1,>1} + λI)⁻¹ ((G w)_{>1} + λ w_{>1} − H_{>1,1} q_1);
    3. GPTQ's error feedback on v_{>1} with H_{>1,>1} + λI.

All the error carried in from earlier layers (X̃ ≠ X) is absorbed by steps 1 and 2.  When
X̃ = X (G = H), p_1 = w_1 and step 2 is GPTQ's own update for column 1: Qronos is then GPTQ
with the same damping (``damp_rule="mean-diag", damp=0.01`` reproduces ``GPTQConfig()``).

Damping: λ = damp·mean(diag H) by default (``damp_rule="mean-diag"``, damp 0.01: GPTQ's rule,
so that X̃ = X gives ``GPTQConfig()`` exactly), or λ = damp·λ_max(H) (``"max-eig"``, λ_max by
power iteration), the authors' rule, used there with damp 1e-6 on large language-model
calibration sets; on small calibration sets that tiny λ lets the least-squares refit move
weights far off the grid's range (digits-mlp, 256 samples, 2 bits: 16% of the refitted weights
of the last layer off the grid against 3% with the default; relative logit error 0.26 against
0.15).  The ridge term λ‖w − u‖² is what damping means in the least-squares step (the authors
add λI to G as well as to H).

Inputs that never fire in X̃ (H_tt = 0) are dead: their weights are set to 0; the target
X w still includes their float contribution, which the other columns absorb.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, context, register_method
from specquant.algorithms.common import (
    check_scale_rule,
    to_quantized_weight,
)
from specquant.algorithms.gptq import error_feedback, static_grid
from specquant.algorithms.refine import refine_codes
from specquant.core.grid import GridSpec, round_on_grid
from specquant.core.qweight import QuantizedWeight

DAMP_RULES = ("max-eig", "mean-diag")


@dataclass
class QronosConfig(QuantConfig):
    """Qronos with static scales chosen before the rounding (as GPTQ)."""

    damp: float = 0.01  # λ as a fraction of H's mean diagonal ("mean-diag") or largest eigenvalue ("max-eig")
    damp_rule: str = "mean-diag"  # "mean-diag" (GPTQ's rule) or "max-eig" (the authors', with damp 1e-6)
    block_size: int = 128  # lazy-batch width in columns of the GPTQ-form sweep (speed only)
    act_order: bool = True  # quantize columns by decreasing H_tt = ‖X̃_t‖² (activation order)
    scale_rule: str = "output-mse"  # step size rule (see algorithms.common.choose_scales)
    refine_sweeps: int = 0  # coordinate-descent sweeps on ‖X w − X̃ ŵ‖ afterwards (algorithms.refine); 0 = off

    method = "qronos"
    needs_data = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_config(self)


def validate_config(config: QronosConfig) -> None:
    """Raise one clear ValueError for a bad setting (the config is a mutable dataclass)."""
    d = config.damp
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {d!r}")
    if config.damp_rule not in DAMP_RULES:
        raise ValueError(f"unknown damp_rule {config.damp_rule!r}; allowed: {', '.join(DAMP_RULES)}")
    for name in ("block_size", "refine_sweeps"):
        v = getattr(config, name)
        low = 1 if name == "block_size" else 0
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    check_scale_rule(config.scale_rule)


def largest_eigenvalue(H: torch.Tensor, steps: int = 50) -> float:
    """λ_max of a symmetric positive semidefinite ``H`` (N0, N0) by power iteration from a fixed
    pseudo-random start (deterministic; a slight underestimate at worst, enough for damping)."""
    g = torch.Generator().manual_seed(0)
    b = torch.rand(H.shape[0], generator=g, dtype=torch.float64).to(H.device)  # (N0,)
    lam = 0.0
    for _ in range(steps):
        hb = H @ b  # (N0,)
        lam = float(b @ hb / (b @ b))  # Rayleigh quotient
        norm = hb.norm()
        if norm == 0:
            return 0.0
        b = hb / norm
    return lam


def damping(H: torch.Tensor, damp: float, rule: str) -> float:
    """λ added to the diagonal of ``H`` (N0, N0): ``damp`` times λ_max(H) or its mean diagonal."""
    if damp == 0:
        return 0.0
    if rule == "max-eig":
        return damp * largest_eigenvalue(H)
    return damp * float(torch.diagonal(H).mean())


def _round(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Nearest grid value of ``w`` (out,) for step ``s`` and zero point ``z`` (out,); step 0 gives 0."""
    return round_on_grid(w, s, z, spec)


def qronos_core(
    W: torch.Tensor,  # (out, N0) float weights: the target is X w_i for each row w_i
    H: torch.Tensor,  # (N0, N0) X̃ᵀX̃
    G: torch.Tensor,  # (N0, N0) X̃ᵀX
    S: torch.Tensor,  # (out, N0) step per entry
    Z: torch.Tensor,  # (out, N0) zero point per entry
    spec: GridSpec,
    col_order: torch.Tensor,  # (N0,) processing order
    damp: float = 0.01,
    damp_rule: str = "mean-diag",
    block_size: int = 128,
    layer: str = "layer",
) -> torch.Tensor:
    """Quantized Ŵ (out, N0) in the original column order (steps 1–3 of the module docstring)."""
    H = H.double().clone()
    dead = torch.diagonal(H) == 0  # (N0,) inputs that are 0 on every row of X̃
    H[dead, dead] = 1.0  # their rows and columns of H are 0: this decouples them
    Wd = W.double()
    GW = Wd @ G.double().T  # (out, N0) row i: (G w_i)ᵀ = (X̃ᵀ X w_i)ᵀ, with the dead inputs' float weights
    V = torch.where(dead[None, :], torch.zeros_like(Wd), Wd)  # (out, N0) current values; dead inputs' are 0
    H = H[col_order][:, col_order]
    GW = GW[:, col_order]
    V = V[:, col_order]
    S = S.double()[:, col_order]
    Z = Z.double()[:, col_order]
    n = H.shape[0]
    lam = damping(H, damp, damp_rule)
    # 1. correct the past: the first column's least-squares value with the others at w, rounded.
    p1 = (GW[:, 0] - V[:, 1:] @ H[1:, 0]) / H[0, 0]  # (out,)
    q1 = _round(p1, S[:, 0], Z[:, 0], spec)  # (out,)
    if n == 1:
        return q1[:, None]
    # 2. shape the future: ridge least squares for the other columns given q1.
    A = H[1:, 1:] + lam * torch.eye(n - 1, dtype=torch.float64, device=H.device)  # (N0−1, N0−1)
    try:
        L = torch.linalg.cholesky(A)  # (N0−1, N0−1) lower
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of A⁻¹
    except RuntimeError as e:
        raise ValueError(f"Qronos: the damped Hessian of layer '{layer}' is not positive definite; "
                         f"raise damp (now {damp}, rule {damp_rule}): {str(e).splitlines()[0]}") from None
    rhs = GW[:, 1:] + lam * V[:, 1:] - q1[:, None] * H[0, 1:][None, :]  # (out, N0−1)
    V1 = torch.cholesky_solve(rhs.T.contiguous(), L).T  # (out, N0−1)
    # 3. the rest: GPTQ's error feedback with the damped H of the remaining columns.
    Q1 = error_feedback(V1, U, S[:, 1:], Z[:, 1:], spec, block_size)  # (out, N0−1)
    Q = torch.cat([q1[:, None], Q1], dim=1)  # (out, N0) in processing order
    return Q[:, torch.argsort(col_order)]


def quantize_weight(W: torch.Tensor, stats: LayerStats, config: QronosConfig,
                    ctx: QuantContext | None = None) -> QuantizedWeight:
    """Qronos on one layer: ``W`` (out, N0) and its statistics (H, G) → QuantizedWeight.  Pure
    function (deterministic; ``ctx.layer`` names the layer in errors)."""
    validate_config(config)
    ctx = context(ctx, config)
    if stats is None:
        raise ValueError(f"Qronos needs calibration statistics (H, G) for layer '{ctx.layer}'")
    spec, gran = config.grid_spec(), config.granularity
    scale, zp, S, Z, col_order = static_grid(W, stats.H, spec, config)
    W_hat = qronos_core(W, stats.H, stats.G, S, Z, spec, col_order, config.damp, config.damp_rule,
                        config.block_size, ctx.layer)
    W_hat = refine_codes(W, W_hat, stats.H, stats.G, S, Z, spec, config.refine_sweeps, col_order, config.block_size)
    info = {"damp": config.damp, "damp_rule": config.damp_rule, "act_order": config.act_order,
            "scale_rule": config.scale_rule, "refine_sweeps": config.refine_sweeps}
    return to_quantized_weight(W_hat, scale, zp, spec, gran, "qronos", info, W.dtype, config.scale_dtype)


register_method("qronos", QronosConfig, quantize_weight,
                "GPTQ-form rounding that also corrects the error of earlier layers (Qronos, Zhang et al.)")
