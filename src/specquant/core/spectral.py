"""Spectral diagnostics of weight matrices and the error bounds of the spectral-limits note.

Every function views a weight as a matrix first (:func:`as_matrix`: conv weights
(out, in, kh, kw) become (out, in·kh·kw)) and computes singular values in float64.

The note (``shared/seeds/000_…``) states two weight-error bounds for b-bit quantization:

* operator norm:  ‖W − Q_b(W)‖_op ≤ ‖W‖_op / 2^b
* Frobenius:      ‖W − Q_b(W)‖_F  ≤ √d · ‖W‖_∞ / 2^b

They are *claims*; :func:`op_error_bound` and :func:`frobenius_error_bound` report the
measured error, the bound and their ratio, and never assume the bound holds.

Reading of the Frobenius bound: ``d`` is the number of entries of W and ‖W‖_∞ = max |w_ij|
(the entrywise max norm).  The bound is then exactly what an entrywise error of at most
‖W‖_∞/2^b gives (‖E‖_F ≤ √d·max|e_ij|), which is the rounding error Δ/2 of the note's own
Q_b (Δ = (w_max − w_min)/2^b ≤ 2‖W‖_∞/2^b, no clipping).  The other reading, ‖W‖_∞ as the
induced max-row-sum norm, is looser by up to a factor of the row length and is not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specquant.core.grid import check_bits, check_finite
from specquant.core.quantizer import quantize_tensor
from specquant.core.qweight import QuantizedWeight


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """The matrix view of a weight: (out, in) as is, (out, in, k…) as (out, in·k…)."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() < 2:
        raise ValueError(
            f"spectral diagnostics need a weight with >= 2 dimensions, got shape {tuple(w.shape)}"
        )
    if w.numel() == 0:
        raise ValueError(f"empty weight of shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of ``as_matrix(w)`` in float64, descending, min(out, in·k…) of them."""
    m = as_matrix(w).detach().to(torch.float64)
    check_finite(m, "weight")
    return torch.linalg.svdvals(m)


def _noise_floor(s: torch.Tensor, shape: tuple[int, int]) -> float:
    """Singular values at or below this are zero to float64 precision (numpy's matrix_rank rule)."""
    return float(s[0]) * max(shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0


def operator_norm(w: torch.Tensor) -> float:
    """‖W‖_op = σ_max of the matrix view."""
    return float(singular_values(w)[0])


def smallest_singular_value(w: torch.Tensor) -> float:
    """σ_min = the min(m, n)-th singular value; 0.0 when below the float64 noise floor
    σ_max·max(m, n)·eps (such a matrix is singular to working precision)."""
    s = singular_values(w)
    smin = float(s[-1])
    return 0.0 if smin <= _noise_floor(s, tuple(as_matrix(w).shape)) else smin


def condition_number(w: torch.Tensor) -> float:
    """κ = σ_max/σ_min (``inf`` when σ_min is 0, see :func:`smallest_singular_value`)."""
    smax = operator_norm(w)
    smin = smallest_singular_value(w)
    return math.inf if smin == 0.0 else smax / smin


def lock_bits(kappa: float) -> int | None:
    """The note's "lock" width ⌈log₂ κ⌉ (0 for κ ≤ 1); None when κ is infinite or NaN."""
    if not math.isfinite(kappa):
        return None
    if kappa <= 1.0:
        return 0
    return math.ceil(math.log2(kappa))


def effective_rank(w: torch.Tensor, tau: float = 1e-3) -> int:
    """Number of singular values σ_i > τ·σ_1 (0 for the zero matrix)."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    s = singular_values(w)
    if float(s[0]) == 0.0:
        return 0
    return int((s > tau * s[0]).sum())


def stable_rank(w: torch.Tensor) -> float:
    """‖W‖_F² / ‖W‖_op² (between 1 and rank(W); 0.0 for the zero matrix)."""
    s = singular_values(w)
    top = float(s[0]) ** 2
    return 0.0 if top == 0.0 else float((s**2).sum()) / top


@dataclass(frozen=True)
class SpectralSummary:
    """Spectral statistics of one weight, all from one SVD."""

    shape: tuple[int, int]  # matrix view (out, in·k…)
    op_norm: float  # σ_max
    sigma_min: float  # σ_min (0.0 below the float64 noise floor)
    condition_number: float  # σ_max/σ_min, inf when σ_min = 0
    effective_rank: int  # count of σ_i > tau·σ_max
    stable_rank: float  # ‖W‖_F²/‖W‖_op²
    frobenius_norm: float  # ‖W‖_F
    tau: float  # threshold used for effective_rank


def spectral_summary(w: torch.Tensor, tau: float = 1e-3) -> SpectralSummary:
    """All spectral statistics of ``w`` from a single SVD (what per-layer tables want)."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    shape = tuple(as_matrix(w).shape)
    s = singular_values(w)
    smax = float(s[0])
    smin = float(s[-1])
    if smin <= _noise_floor(s, shape):
        smin = 0.0
    fro2 = float((s**2).sum())
    return SpectralSummary(
        shape=shape,
        op_norm=smax,
        sigma_min=smin,
        condition_number=math.inf if smin == 0.0 else smax / smin,
        effective_rank=0 if smax == 0.0 else int((s > tau * s[0]).sum()),
        stable_rank=0.0 if smax == 0.0 else fro2 / smax**2,
        frobenius_norm=math.sqrt(fro2),
        tau=tau,
    )


@dataclass(frozen=True)
class BoundCheck:
    """A measured weight error next to a claimed upper bound."""

    norm: str  # "op" or "fro"
    bits: int  # b in the bound
    measured: float  # ‖W − Ŵ‖ in that norm
    bound: float  # the claimed upper bound
    ratio: float  # measured / bound (> 1: the bound fails); inf if bound is 0 < measured, 0 if both 0

    @property
    def holds(self) -> bool:
        return self.measured <= self.bound


def _ratio(measured: float, bound: float) -> float:
    if bound > 0:
        return measured / bound
    return 0.0 if measured == 0 else math.inf


def _pair(w: torch.Tensor, w_hat: "torch.Tensor | QuantizedWeight") -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(w_hat, QuantizedWeight):
        w_hat = w_hat.dequantize()
    if tuple(w.shape) != tuple(w_hat.shape):
        raise ValueError(f"W {tuple(w.shape)} and W_hat {tuple(w_hat.shape)} differ in shape")
    m = as_matrix(w).detach().to(torch.float64)
    m_hat = as_matrix(w_hat).detach().to(torch.float64).to(m.device)
    check_finite(m, "W")
    check_finite(m_hat, "W_hat")
    return m, m_hat


def op_error_bound(w: torch.Tensor, w_hat: "torch.Tensor | QuantizedWeight", bits: int) -> BoundCheck:
    """‖W − Ŵ‖_op against the note's bound ‖W‖_op / 2^b."""
    check_bits(bits)
    m, m_hat = _pair(w, w_hat)
    measured = float(torch.linalg.matrix_norm(m - m_hat, ord=2))
    bound = float(torch.linalg.matrix_norm(m, ord=2)) / 2**bits
    return BoundCheck("op", bits, measured, bound, _ratio(measured, bound))


def frobenius_error_bound(w: torch.Tensor, w_hat: "torch.Tensor | QuantizedWeight", bits: int) -> BoundCheck:
    """‖W − Ŵ‖_F against √d·‖W‖_∞/2^b, d = number of entries, ‖W‖_∞ = max |w_ij|."""
    check_bits(bits)
    m, m_hat = _pair(w, w_hat)
    measured = float(torch.linalg.matrix_norm(m - m_hat, ord="fro"))
    bound = math.sqrt(m.numel()) * float(m.abs().max()) / 2**bits
    return BoundCheck("fro", bits, measured, bound, _ratio(measured, bound))


def spectral_norm_quantize(w: torch.Tensor, bits: int, **quantize_kwargs) -> QuantizedWeight:
    """Q_b^spec(W) = ‖W‖_op · Q_b(W / ‖W‖_op), with Q_b = ``quantize_tensor(·, bits, **kwargs)``.

    The returned weight's ``scale`` has absorbed ‖W‖_op, so ``dequantize()`` is Q_b^spec(W);
    ``info["spectral_norm"]`` records ‖W‖_op.  Note: a quantizer whose grid is set from the data
    (min-max, MSE, percentile … clipping) is scale-equivariant, Q_b(cW) = c·Q_b(W), so this gives
    the same result as Q_b(W) up to float rounding; the normalisation only matters for a
    grid fixed in absolute terms.
    """
    op = operator_norm(w)
    if op == 0.0:
        qw = quantize_tensor(w, bits, **quantize_kwargs)
    else:
        qw = quantize_tensor(w / op, bits, **quantize_kwargs)
        qw.scale = qw.scale * op
    qw.info = {**qw.info, "spectral_norm": op, "spectral": True}
    return qw
