"""Data-free frame quantization: Sigma-Delta over unit-norm tight frames (Czaja & Na 2024).

W. Czaja and S. Na, "Frame Quantization of Neural Networks", arXiv:2404.08131 (2024).

Each weight vector ``v ∈ R^d`` (by default an output neuron's row of the (out, in·kh·kw) view)
is expanded in a finite unit-norm tight frame ``{e_n}`` of ``N = ceil(r·d)`` vectors (r is the
redundancy), its frame coefficients ``x_n = ⟨v, e_n⟩`` are quantized along n with a ΣΔ scheme
of step δ on the 2^b-level mid-rise alphabet, and the weights are rebuilt with the canonical
dual, ``ṽ = (d/N)·Σ_n q_n e_n``.  For first order, summation by parts gives
``‖v − ṽ‖ ≤ (d/N)·(δ/2)·(σ(F) + 1)`` with σ(F) = Σ‖e_n − e_{n+1}‖ the frame variation (the
Benedetto, Powell & Yılmaz 2006 bound that Czaja & Na build on), so at fixed δ the error falls
at least like 1/N for a harmonic frame, whose variation does not grow with N.  What is stored
are the ΣΔ codes (N per vector, b bits each) and δ; the frame is rebuilt from (kind, d, N, seed).
True storage is therefore ``b·N/d`` bits per original weight plus the scale overhead:
redundancy costs bits one for one.

Step rule (``FrameConfig.step``), with ρ = ``core.sigma_delta.stable_input_bound(bits, order)``
(ρ = K − ½ for first order, K − 3/2 for second order with b ≥ 2, 0.2 for 1-bit second order):

* ``"max"`` (default): ``δ = max_n |x_n| / ρ``, the smallest step for which the coefficients
  satisfy the stability condition ``|x_n| ≤ ρ·δ`` (no overload, bounded states).
* ``"norm"``: ``δ = ‖v‖₂ / ρ``, the rule behind the paper's guarantee (``|x_n| ≤ ‖v‖₂`` for any
  unit-norm frame, so stability holds without looking at the coefficients); much coarser.

Either is multiplied by ``step_scale`` and taken per quantized vector (``granularity="channel"``)
or as one step for the whole tensor (``granularity="tensor"``, the maximum of the per-vector ones).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, register_method
from specquant.core.frames import FRAME_KINDS, check_frame_size, frame_size, make_frame
from specquant.core.grid import Granularity, GridSpec, check_bits, check_finite, round_scale, scale_dtype
from specquant.core.qweight import FrameQuantizedWeight
from specquant.core.sigma_delta import SD_ORDERS, sigma_delta, stable_input_bound

STEP_RULES = ("max", "norm")
FRAME_DIMS = ("input", "output")


@dataclass
class FrameConfig(QuantConfig):
    """Frame ΣΔ quantization.  ``bits`` is the bits per ΣΔ code (1..8), not per weight.

    ``granularity`` chooses one step δ per quantized vector ("channel") or per tensor ("tensor");
    ``symmetric`` is unused (the ΣΔ alphabet is always the symmetric mid-rise one).
    """

    redundancy: float = 2.0  # N/d >= 1: frame vectors per vector entry; N = ceil(redundancy·d) codes
    order: int = 1  # Sigma-Delta order: 1 (first order) or 2 (second order; see core.sigma_delta)
    frame: str = "harmonic"  # "harmonic" (smooth frame path, the paper's choice) or "random" (seeded)
    step: str = "max"  # δ rule: "max" (max|x_n|/ρ, the default) or "norm" (‖v‖₂/ρ); see the module doc
    step_scale: float = 1.0  # multiplies δ (< 1 gives finer steps but may overload the quantizer)
    dim: str = "input"  # "input": quantize each output neuron's row (d = in·kh·kw);
    #                     "output": each input column (d = out)

    method = "frame"
    needs_data = False

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_config(self)


def validate_config(config: FrameConfig) -> None:
    """Raise one clear ValueError for a bad setting (the config is a mutable dataclass)."""
    check_bits(config.bits)
    r = config.redundancy
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 1:
        raise ValueError(
            f"redundancy must be a finite number >= 1 (frame size N = redundancy·d >= d), got {r!r}"
        )
    if isinstance(config.order, bool) or config.order not in SD_ORDERS:
        raise ValueError(f"order must be 1 or 2, got {config.order!r}")
    if config.frame not in FRAME_KINDS:
        raise ValueError(f"unknown frame {config.frame!r}; allowed: {', '.join(FRAME_KINDS)}")
    if config.step not in STEP_RULES:
        raise ValueError(f"unknown step rule {config.step!r}; allowed: {', '.join(STEP_RULES)}")
    s = config.step_scale
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"step_scale must be a finite number > 0, got {s!r}")
    if config.dim not in FRAME_DIMS:
        raise ValueError(f"unknown dim {config.dim!r}; allowed: {', '.join(FRAME_DIMS)}")
    if config.granularity.kind not in ("channel", "tensor"):
        raise ValueError(
            f"frame quantization supports granularity 'channel' (one step per vector) or 'tensor', "
            f"got {config.granularity.label()!r}"
        )


def _check_tensor(w: torch.Tensor, name: str, min_dim: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not torch.is_floating_point(w):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.dim() < min_dim or w.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor with >= {min_dim} dims, got shape {tuple(w.shape)}")
    check_finite(w, name)


def _quantize_vectors(
    V: torch.Tensor, config: FrameConfig, weight_shape: tuple, dtype: torch.dtype, along: str
) -> FrameQuantizedWeight:
    """Quantize the columns of V (d, M) in one frame; the shared core of weights and biases."""
    d, M = V.shape
    N = frame_size(d, config.redundancy)
    check_frame_size(d, N)
    F = make_frame(config.frame, d, N, config.seed)  # (d, N) float64
    X = F.transpose(0, 1) @ V  # (N, M) frame coefficients x_n = ⟨v, e_n⟩
    rho = stable_input_bound(config.bits, config.order)
    ref = X.abs().amax(dim=0) if config.step == "max" else V.norm(dim=0)  # (M,)
    delta = ref / rho * config.step_scale
    if config.granularity.kind == "tensor":
        delta = delta.max().expand(M)
    delta = round_scale(delta, config.scale_dtype, "a frame step").double()  # the step stored is the step used
    res = sigma_delta(X, delta, config.bits, order=config.order)
    K = 1 << (config.bits - 1)
    scale_shape = (1, 1) if config.granularity.kind == "tensor" else (1, M)
    scale = delta[:1] if config.granularity.kind == "tensor" else delta
    spec = GridSpec(config.bits, "binary" if config.bits == 1 else "midrise")
    max_state = res.max_state / delta.clamp_min(torch.finfo(torch.float64).tiny)  # in units of δ
    return FrameQuantizedWeight(
        codes=res.codes,
        scale=scale.float().reshape(scale_shape),
        zero_point=torch.full(scale_shape, K - 0.5, dtype=torch.float32),
        spec=spec,
        granularity=Granularity("tensor" if config.granularity.kind == "tensor" else "channel", axis=1),
        dtype=dtype,
        algorithm="frame",
        scale_dtype=scale_dtype(config.scale_dtype),
        info={
            "redundancy": N / d,
            "order": config.order,
            "frame": config.frame,
            "frame_dim": d,
            "frame_size": N,
            "step": config.step,
            "step_scale": config.step_scale,
            "dim": along,
            "seed": config.seed,
            "code_bits_per_weight": config.bits * N / d,
            "max_state_over_delta": float(max_state.max()),
        },
        weight_shape=tuple(weight_shape),
        frame_kind=config.frame,
        frame_dim=d,
        frame_size=N,
        frame_seed=config.seed,
        order=config.order,
        along=along,
    )


def quantize_weight(W: torch.Tensor, stats: LayerStats | None, config: FrameConfig,
                    ctx: QuantContext | None = None) -> FrameQuantizedWeight:
    """Frame ΣΔ quantization of one weight tensor (Czaja & Na 2024, arXiv:2404.08131).

    Args:
        W: (out, in) weights; conv weights (out, in, kh, kw) are viewed as (out, in·kh·kw).
        stats: ignored (the method is data-free); accepted for the common signature.
        config: a ``FrameConfig``.  With ``dim="input"`` each row (length d = in·kh·kw) is one
            vector; with ``dim="output"`` each column (length d = out) is.
        ctx: the seed of a random frame is ``ctx.seed`` (the engine passes ``config.seed``, the
            seed used when ``ctx`` is None).

    Returns a ``FrameQuantizedWeight`` holding N = ceil(redundancy·d) ΣΔ codes per vector (uint8,
    (N, M)), the steps δ and the frame parameters; its ``bits_per_weight()`` is
    ``bits·N/d`` plus the scale overhead.
    """
    if not isinstance(config, FrameConfig):
        raise TypeError(f"config must be a FrameConfig, got {type(config).__name__}")
    validate_config(config)
    if config.grid != "int":
        raise ValueError(f"the frame method codes Sigma-Delta coefficients on uniform grids, not {config.grid}")
    if ctx is not None and ctx.seed != config.seed:
        config = dataclasses.replace(config, seed=ctx.seed)
    _check_tensor(W, "weight", 2)
    W2 = W.detach().to(torch.float64).reshape(W.shape[0], -1)  # (out, d)
    V = W2.transpose(0, 1) if config.dim == "input" else W2  # (d, M): one vector per column
    return _quantize_vectors(V.contiguous(), config, tuple(W.shape), W.dtype, config.dim)


def quantize_bias(b: torch.Tensor, config: FrameConfig) -> FrameQuantizedWeight:
    """Frame ΣΔ quantization of a bias vector (length out), treated as one vector of R^out."""
    if not isinstance(config, FrameConfig):
        raise TypeError(f"config must be a FrameConfig, got {type(config).__name__}")
    validate_config(config)
    _check_tensor(b, "bias", 1)
    if b.dim() != 1:
        raise ValueError(f"bias must be 1-D, got shape {tuple(b.shape)}")
    V = b.detach().to(torch.float64).reshape(-1, 1)  # (out, 1)
    return _quantize_vectors(V, config, tuple(b.shape), b.dtype, "bias")


register_method("frame", FrameConfig, quantize_weight,
                "Sigma-Delta over unit-norm tight frames, data-free (Czaja & Na)")
