"""Error and distribution metrics: plain functions on tensors (or arrays) returning floats.

All statistics are computed in float64 over every element of the inputs (population moments).
"""
from __future__ import annotations

import math

import numpy as np
import torch

DB_PER_BIT = 6.02  # 20·log10(2) ≈ 6.0206 dB: one bit of resolution halves the step, quarters the MSE


def _f64(x) -> torch.Tensor:
    """Detached float64 CPU tensor of ``x`` (a tensor, array or number)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _same_shape(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")


def mse(x, y) -> float:
    """Mean squared difference ``mean((x − y)²)``."""
    x, y = _f64(x), _f64(y)
    _same_shape(x, y, "mse")
    return float((x - y).square().mean())


def sqnr(x, x_hat) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖x‖² / ‖x − x̂‖²)`` in dB.

    ``+inf`` when ``x̂`` equals ``x`` exactly (also for x = 0); ``−inf`` when x = 0 but x̂ ≠ 0.
    """
    x, x_hat = _f64(x), _f64(x_hat)
    _same_shape(x, x_hat, "sqnr")
    noise = float((x - x_hat).square().sum())
    if noise == 0.0:
        return math.inf
    signal = float(x.square().sum())
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def effective_bits(sqnr_db: float) -> float:
    """Effective bits of resolution ``SQNR / 6.02`` (6.02 dB per bit)."""
    return float(sqnr_db) / DB_PER_BIT


def excess_kurtosis(x) -> float:
    """Excess kurtosis ``E[(x−μ)⁴]/σ⁴ − 3``: 0 for a Gaussian, 3 for a Laplace, −1.2 for a uniform.

    Returns 0.0 for a constant input (no spread, nothing heavy-tailed).
    """
    x = _f64(x).flatten()
    d = x - x.mean()
    m2 = float(d.square().mean())
    if m2 == 0.0:
        return 0.0
    return float(d.pow(4).mean()) / (m2 * m2) - 3.0


def outlier_share(x, k: float = 3.0) -> float:
    """Share of values farther than ``k·σ`` from the mean (≈ 0.0027 for a Gaussian with k = 3)."""
    x = _f64(x).flatten()
    mu, sigma = x.mean(), x.std(correction=0)
    return float(((x - mu).abs() > k * sigma).double().mean())


def kl_divergence(p_hist, q_hist, eps: float = 1e-10) -> float:
    """KL(P‖Q) in nats between two histograms of the same length.

    Both are normalised to sum 1, ``eps`` is added to every bin (so empty bins of Q are heavily
    penalised instead of dividing by zero) and they are normalised again.
    """
    p = np.asarray(p_hist.detach().cpu() if isinstance(p_hist, torch.Tensor) else p_hist, dtype=np.float64)
    q = np.asarray(q_hist.detach().cpu() if isinstance(q_hist, torch.Tensor) else q_hist, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"kl_divergence: histogram shapes differ, {p.shape} vs {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise ValueError("kl_divergence: histograms must be non-negative")
    p = p.ravel() / max(p.sum(), np.finfo(np.float64).tiny) + eps
    q = q.ravel() / max(q.sum(), np.finfo(np.float64).tiny) + eps
    p /= p.sum()
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


def rd_gap_db(x, x_hat, rate_bits: float) -> float:
    """Gap in dB between the measured MSE and the Gaussian rate-distortion bound.

    ``10·log10(MSE / D(R))`` with ``D(R) = σ²·2^(−2R)``, σ² the variance of ``x`` and R =
    ``rate_bits`` per value.  No code of rate R does better than D(R) on Gaussian data, so the
    gap of a quantizer is ≥ 0; a uniform scalar quantizer stays ≥ 10·log10(πe/6) ≈ 1.53 dB
    above it at high rate.  ``−inf`` for an exact reconstruction.
    """
    x, x_hat = _f64(x), _f64(x_hat)
    _same_shape(x, x_hat, "rd_gap_db")
    var = float(x.var(correction=0))
    if var == 0.0:
        raise ValueError("rd_gap_db: x has zero variance, the Gaussian bound D(R) = 0")
    err = float((x - x_hat).square().mean())
    if err == 0.0:
        return -math.inf
    return 10.0 * math.log10(err / (var * 2.0 ** (-2.0 * float(rate_bits))))
