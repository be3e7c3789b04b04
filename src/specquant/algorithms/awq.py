"""AWQ: activation-aware per-input-channel weight scaling, searched before rounding.

Reference: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration", MLSys 2024.

The layers that read one input X (m, N0) (q/k/v after a norm, gate/up after a norm, down after
up) are rescaled together: every weight column j is multiplied by s_j and the input channel j
divided by s_j, which leaves the float function unchanged, ``X w = (X/s)(w·s)``.  Rounding the
scaled weights protects the columns that meet large activations: the rounding error of column
j, measured at the output, is divided by s_j.  AWQ takes

    s = s_X^α / sqrt(max(s_X^α) · min(s_X^α)),    α on the grid {0, 1/n, …, (n−1)/n},

where s_X is the per-channel activation magnitude, and keeps the α whose quantized layers give
the smallest output error.  Here the error of every α is computed exactly from the layer
statistics (no forward pass): for each layer i sharing the input,

    ‖X w_i − X̃ ŵ_i(α)‖²,   ŵ_i(α) = Q(w_i · s) / s,

summed over the rows and layers (``common.row_output_error`` with H = X̃ᵀX̃, G = X̃ᵀX, F = XᵀX).
α = 0 gives s = 1, plain rounding, and is on the grid: the chosen α never does worse than
plain rounding on this loss (ties go to the smaller α).

The "awq" method then rounds the scaled weights with AWQ's second step, the clipping search:
each group's range is shrunk by the factor (min/max included) that minimises that group's output
error against its inputs' block of H (``scale_rule="output-mse"``; the α search itself scores
plain min/max rounding, as the paper's code does).  ``awq+NAME`` keeps NAME's own range rule.

This module is pure (tensors in, tensors out); ``engine/awq.py`` finds the layer groups, folds
1/s into the module that produces their input and runs the method's rounding afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specquant.algorithms.base import LayerStats, QuantConfig, register_method
from specquant.algorithms.common import row_output_error, target_energy
from specquant.algorithms.rtn import RTNConfig
from specquant.algorithms.rtn import quantize_weight as rtn_quantize_weight
from specquant.core.grid import Granularity

FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # W (out, N0) -> Ŵ (out, N0) on the grid used afterwards

SCALE_FLOOR = 1e-4  # s_X is clamped to at least this fraction of its largest entry (dead inputs)


@dataclass(frozen=True)
class AWQResult:
    """The outcome of the α search for one group of layers sharing an input."""

    scale: torch.Tensor  # (N0,) float64, > 0: W[:, j] is multiplied by scale[j], input channel j divided by it
    alpha: float  # the chosen exponent (0.0: no scaling, scale is all ones)
    alphas: torch.Tensor  # (n_grid,) float64: the grid searched, 0, 1/n, …, (n−1)/n
    losses: torch.Tensor  # (n_grid,) float64: summed output error Σ_i ‖X w_i − X̃ ŵ_i(α)‖² of each α

    @property
    def loss(self) -> float:
        """The loss of the chosen α."""
        return float(self.losses.min())

    @property
    def loss_plain(self) -> float:
        """The loss of α = 0 (plain rounding, no scaling)."""
        return float(self.losses[0])


def activation_scale(stats: LayerStats) -> torch.Tensor:
    """Per-input-channel magnitude s_X (N0,) from the covariance statistics: the RMS
    sqrt(diag(F)/m) of the float input (sqrt(diag(H)/m) when F was not kept).

    The paper uses the mean |x| per channel; the N0×N0 statistics only hold second moments,
    and the RMS is the closest they give (RMS ≥ mean |x|, equal for constant magnitudes; both
    rank the outlier channels first, and the α search absorbs the difference in spread).  The
    engine, which sees the activations, passes the paper's mean |x| instead (``act_scale``)."""
    M = stats.F if stats.F is not None else stats.H  # (N0, N0)
    return (torch.diagonal(M).double().clamp_min(0) / max(stats.n_rows, 1)).sqrt()


def scales_for(act_scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α / sqrt(max · min) (N0,) float64, with s_X clamped to ``SCALE_FLOOR`` of its
    maximum so that inputs that never fire get a finite scale; all ones when α = 0 or s_X = 0."""
    a = act_scale.double()
    top = float(a.max()) if a.numel() else 0.0
    if alpha == 0 or not top > 0:
        return torch.ones_like(a)
    s = a.clamp_min(SCALE_FLOOR * top).pow(alpha)  # (N0,)
    return s / (s.max() * s.min()).sqrt()


def rtn_fake_quant(bits: int, granularity: Granularity | str, symmetric: bool, scale_rule: str = "mse") -> FakeQuant:
    """Round-to-nearest fake quantization W (out, N0) -> Ŵ (out, N0) float64: exactly what
    ``rtn.quantize_weight`` stores for the float32 weight, on the default grid of
    ``bits``/``symmetric`` with ``granularity`` and a data-free range rule ("output-mse" needs the
    layer's H and falls back to "mse", see ``common.choose_scales``)."""
    config = RTNConfig(bits=bits, granularity=granularity, symmetric=symmetric, scale_rule=scale_rule)

    def quantize(W: torch.Tensor) -> torch.Tensor:
        return rtn_quantize_weight(W.float(), None, config).dequantize().double()

    return quantize


def alpha_grid(n_grid: int) -> torch.Tensor:
    """α = 0, 1/n, …, (n−1)/n (n,) float64: the paper's grid over [0, 1)."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"the AWQ grid needs a positive integer number of points, got {n_grid!r}")
    return torch.arange(n_grid, dtype=torch.float64) / n_grid


def awq_scales(Ws: Sequence[torch.Tensor], stats: LayerStats, quantize: FakeQuant | Sequence[FakeQuant],
               n_grid: int = 20, act_scale: torch.Tensor | None = None) -> AWQResult:
    """Search AWQ's exponent α for the layers ``Ws`` (each (out_i, N0)) that share one input.

    Args:
        Ws: the float weights of every layer that reads the input (their losses are summed).
        stats: the input's statistics (H, G, F over N0 channels; F = None drops the constant
            ‖X w_i‖² from the losses, which does not change the choice).
        quantize: the fake quantization used afterwards, W -> Ŵ (e.g. ``rtn_fake_quant``), or
            one per layer of ``Ws`` when their settings differ.
        n_grid: number of α values, 0, 1/n, …, (n−1)/n.
        act_scale: s_X (N0,), the per-channel activation magnitude (the engine passes the
            paper's mean |x|); default: the RMS from ``stats`` (see ``activation_scale``).

    Deterministic: no randomness, ties go to the smaller α.  Pure function.
    """
    Ws = list(Ws)
    if not Ws:
        raise ValueError("AWQ needs at least one layer")
    n0 = stats.dim
    for i, W in enumerate(Ws):
        if W.dim() != 2 or W.shape[1] != n0:
            raise ValueError(f"AWQ: layer {i} has weight shape {tuple(W.shape)}, the input has {n0} channels")
    quants = list(quantize) if isinstance(quantize, Sequence) else [quantize] * len(Ws)
    if len(quants) != len(Ws):
        raise ValueError(f"AWQ: {len(quants)} quantizers for {len(Ws)} layers")
    s_x = activation_scale(stats) if act_scale is None else act_scale.double()  # (N0,)
    if s_x.shape != (n0,) or not bool(torch.isfinite(s_x).all()) or bool((s_x < 0).any()):
        raise ValueError(f"AWQ: the activation scale must be {n0} finite non-negative values")
    H, G = stats.H.double(), stats.G.double()  # (N0, N0)
    F = None if stats.F is None else stats.F.double()
    # Float inputs (X̃ = X: the engine passes one matrix as H, G and F): the loss of a row is
    # (ŵ − w)ᵀF(ŵ − w), one product per α instead of three (the same value, without cancellation).
    float_inputs = F is not None and stats.H is stats.G and stats.G is stats.F
    Wds = [W.double() for W in Ws]  # (out_i, N0)
    energies = [None if F is None or float_inputs else target_energy(Wd, F) for Wd in Wds]  # (out_i,): fixed
    alphas = alpha_grid(n_grid)
    losses = torch.empty(n_grid, dtype=torch.float64)
    for k, alpha in enumerate(alphas.tolist()):
        s = scales_for(s_x, alpha)  # (N0,)
        total = 0.0
        for Wd, q, energy in zip(Wds, quants, energies):
            W_hat = q(Wd * s).double() / s  # (out_i, N0): Q(w·s)/s
            if float_inputs:
                D = W_hat - Wd  # (out_i, N0)
                total += float((D @ F * D).sum(1).clamp_min(0).sum())
            else:
                total += float(row_output_error(Wd, W_hat, H, G, energy).sum())
        losses[k] = total
    best = int(torch.argmin(losses))  # first minimum: the smallest α among ties
    alpha = float(alphas[best])
    return AWQResult(scale=scales_for(s_x, alpha), alpha=alpha, alphas=alphas, losses=losses)


# --------------------------------------------------------------------------- the "awq" method


@dataclass
class AWQConfig(RTNConfig):
    """AWQ scales (searched and folded by the engine before the layer walk), then AWQ's clipping search
    and round-to-nearest.

    The same as ``RTNConfig(awq=True)``; any other method takes AWQ with ``awq=True`` (the CLI's
    ``--method awq+gptq`` and so on)."""

    scale_rule: str = "output-mse"  # range rule of the rounding after the scales: AWQ's clipping search (each
    #                                 group's (or row's) clip chosen on its output error against the calibration
    #                                 inputs' H, min/max always a candidate); "minmax" skips it. Weight-MSE
    #                                 clipping would clip exactly the scaled-up salient columns AWQ protects
    awq: bool = True  # AWQ pre-step on (this method is AWQ: it cannot be turned off)

    method = "awq"
    needs_data = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.awq:
            raise ValueError("method 'awq' is AWQ scaling then RTN; for RTN alone use method 'rtn'")


def quantize_weight(W: torch.Tensor, stats: LayerStats | None, config: AWQConfig, ctx=None):
    """Round-to-nearest of the (already AWQ-scaled) weight ``W`` (out, N0): the rounding step of
    the "awq" method (``rtn.quantize_weight``, recorded as algorithm "awq").  Pure function."""
    qw = rtn_quantize_weight(W, stats, config, ctx)
    qw.algorithm = "awq"
    return qw


def search_quantizer(config: QuantConfig, bits: int, granularity: Granularity) -> FakeQuant:
    """The RTN fake quantization AWQ's search uses for a layer quantized by ``config`` at ``bits``
    and ``granularity``, on the config's grid.

    Range rule: the config's own when it is data-free (then the search scores exactly the RTN
    rounding that follows); "minmax", the paper's, for "output-mse" (it needs the layer's H, and
    like min-max it does not clip the scaled-up salient columns, which weight-MSE clipping
    would) and for configs without a rule."""
    rule = getattr(config, "scale_rule", "minmax")
    if rule == "output-mse" or (rule == "authors" and not config.symmetric):
        rule = "minmax"
    return rtn_fake_quant(bits, granularity, config.symmetric, rule)


register_method("awq", AWQConfig, quantize_weight,
                "AWQ activation-aware channel scaling and clipping search, then round-to-nearest (Lin et al.; "
                "needs calibration data)")
