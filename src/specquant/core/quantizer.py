"""``quantize_tensor``: round-to-nearest (or stochastic) quantization of one tensor."""
from __future__ import annotations

import torch

from specquant.core.clipping import calibrate, check_clipping
from specquant.core.grid import Granularity, GridSpec, check_bits, check_finite, quantize_codes
from specquant.core.qweight import QuantizedWeight
from specquant.core.rounding import ROUNDING_MODES, make_generator


def compute_qparams(
    w: torch.Tensor, spec: GridSpec, granularity: Granularity, clipping: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ``w`` for the grid, granularity and range calibrator given."""
    scales, zps = [], []
    # one (B, n) matrix of equal-length blocks, or two when the last group of each row is shorter:
    # each block's range comes from its own weights only
    for rows in granularity.row_parts(w.detach().float()):  # (B, n)
        if spec.kind == "binary":
            # sign(w)·α with α = mean|w| minimises ‖w − α·sign(w)‖² over α: no clipping to choose.
            alpha = rows.abs().mean(dim=1)  # (B,)
            scale, zp = spec.qparams_from_alpha(alpha)
        else:
            lo, hi = calibrate(rows, clipping, spec)
            scale, zp = spec.qparams_from_range(lo, hi)
        scales.append(scale)
        zps.append(zp)
    shape = tuple(w.shape)
    return granularity.scale_from_parts(scales, shape), granularity.scale_from_parts(zps, shape)


def quantize_tensor(
    w: torch.Tensor,
    bits: int = 4,
    granularity: "str | tuple | Granularity" = "channel",
    symmetric: bool = True,
    clipping: str = "mse",
    rounding: str = "nearest",
    seed: int | None = None,
    grid: str | None = None,
    axis: int = 0,
    name: str = "tensor",
) -> QuantizedWeight:
    """Quantize ``w`` on a uniform grid.

    Args:
        w: float tensor of any shape (conv weights are (out, in, kh, kw)).
        bits: storage bits per value, 1..8.
        granularity: "tensor", "channel" (along ``axis``), ("group", G) or "group:G"
            (G consecutive inputs of the flattened (out, in·kh·kw) view share a scale; when G does
            not divide in·kh·kw the last group of each row is shorter, with its own scale).
        symmetric: narrow symmetric grid (binary at 1 bit) if True, else asymmetric.
        clipping: range calibrator, one of ``specquant.core.clipping.CLIPPING_METHODS``.
        rounding: "nearest" or "stochastic" (unbiased, seeded by ``seed``).
        grid: overrides ``symmetric`` with an explicit grid kind from ``GRID_KINDS``.
        name: how error messages call the tensor.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not torch.is_floating_point(w):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)})")
    check_bits(bits)
    check_finite(w, name)
    check_clipping(clipping)
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding {rounding!r}; allowed: {', '.join(ROUNDING_MODES)}")
    spec = GridSpec(bits, grid) if grid is not None else GridSpec.default(bits, symmetric)
    g = Granularity.parse(granularity, axis=axis)
    if g.kind == "channel" and not -w.dim() <= g.axis < w.dim():
        raise ValueError(f"channel axis {g.axis} is out of range for {name} of shape {tuple(w.shape)}")
    scale, zp = compute_qparams(w, spec, g, clipping)
    blocked = g.to_blocks(w.detach().float())  # blocked_shape; a shorter last group padded with zeros
    gen = make_generator(seed) if rounding == "stochastic" else None
    codes = quantize_codes(blocked, scale, zp, spec, rounding, gen)
    return QuantizedWeight(
        codes=g.from_blocks(codes, tuple(w.shape)).to(torch.uint8),
        scale=scale,
        zero_point=zp,
        spec=spec,
        granularity=g,
        dtype=w.dtype,
        algorithm="rtn",
        info={"clipping": clipping, "rounding": rounding, "seed": seed},
    )
