"""Uniform affine grids: scale, zero point and levels, with block granularity.

Every grid stores *unsigned* codes ``u`` in ``[0, 2**bits - 1]`` and represents the value
``(u - zero_point) * scale``.  The grid shapes ("kinds") differ only in which codes are used
and where the zero point sits:

===============  =====================================  ==============  =====================
kind             values                                 levels          zero point
===============  =====================================  ==============  =====================
``"narrow"``     0, ±Δ, …, ±(2^(b-1)-1)Δ (mid-tread)     2^b - 1         2^(b-1)
``"full"``       -2^(b-1)Δ … (2^(b-1)-1)Δ (int zero pt.) 2^b             2^(b-1)
``"midrise"``    ±Δ/2, ±3Δ/2, … (symmetric mid-rise)     2^b             (2^b - 1)/2
``"binary"``     ±α (= mid-rise with 1 bit, Δ = 2α)       2               1/2
``"asymmetric"`` (u - z)Δ, z an integer in [0, 2^b-1]    2^b             calibrated
===============  =====================================  ==============  =====================

The clipping value ``alpha`` of a symmetric grid is the largest magnitude it represents
(the outermost level); an asymmetric grid is set from a range ``[lo, hi]`` that contains 0.
A block whose range is zero gets ``scale = 0``: it dequantizes exactly to 0 (or to the
constant, for asymmetric grids) with no division by zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specquant.core.rounding import round_values

GRID_KINDS = ("narrow", "full", "midrise", "binary", "asymmetric")
GRANULARITY_KINDS = ("tensor", "channel", "group")


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 1..8, else raise a one-line ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{what} must be an integer in 1..8, got {bits!r}")
    return bits


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise ValueError naming how many NaN/Inf values ``x`` holds and where the first one is."""
    if not torch.is_floating_point(x):
        return
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad:
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(
            f"{name} has {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} Inf) "
            f"of {x.numel()}; first at index {first}"
        )


@dataclass(frozen=True)
class GridSpec:
    """A uniform grid of ``bits`` bits and a given shape (see the module docstring)."""

    bits: int  # storage bits per code, 1..8
    kind: str  # one of GRID_KINDS

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.kind not in GRID_KINDS:
            raise ValueError(f"unknown grid kind {self.kind!r}; allowed: {', '.join(GRID_KINDS)}")
        if self.kind == "narrow" and self.bits < 2:
            raise ValueError("a narrow (mid-tread) grid needs bits >= 2; use kind='binary' for 1 bit")
        if self.kind == "binary" and self.bits != 1:
            raise ValueError(f"a binary grid has 1 bit, got bits={self.bits}")

    @staticmethod
    def default(bits: int, symmetric: bool = True) -> "GridSpec":
        """The default grid: narrow symmetric (binary at 1 bit) or asymmetric."""
        check_bits(bits)
        if not symmetric:
            return GridSpec(bits, "asymmetric")
        return GridSpec(bits, "binary" if bits == 1 else "narrow")

    @property
    def symmetric(self) -> bool:
        return self.kind != "asymmetric"

    @property
    def qmin(self) -> int:
        """Smallest unsigned code used."""
        return 1 if self.kind == "narrow" else 0

    @property
    def qmax(self) -> int:
        """Largest unsigned code used."""
        return (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        """Number of distinct representable values."""
        return self.qmax - self.qmin + 1

    @property
    def symmetric_zero_point(self) -> float:
        """Zero point of a symmetric grid (fixed by its kind)."""
        if self.kind in ("narrow", "full"):
            return float(1 << (self.bits - 1))
        if self.kind in ("midrise", "binary"):
            return ((1 << self.bits) - 1) / 2.0
        raise ValueError("an asymmetric grid has no fixed zero point")

    @property
    def alpha_steps(self) -> float:
        """Symmetric grids: outermost level = alpha_steps * scale."""
        if self.kind == "narrow":
            return float((1 << (self.bits - 1)) - 1)
        if self.kind == "full":
            return float(1 << (self.bits - 1))
        if self.kind in ("midrise", "binary"):
            return ((1 << self.bits) - 1) / 2.0
        raise ValueError("an asymmetric grid is set from a range, not alpha")

    def qparams_from_alpha(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of a symmetric grid whose outermost level is ``alpha``."""
        scale = alpha.clamp_min(0) / self.alpha_steps
        zp = torch.full_like(scale, self.symmetric_zero_point)
        return scale, zp

    def qparams_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point covering ``[lo, hi]``.

        Symmetric grids use ``alpha = max(|lo|, |hi|)``, except ``"full"``, whose positive side
        stops one step short of alpha: its alpha is widened so that hi is covered as well.
        """
        if self.symmetric:
            if self.kind == "full" and self.bits > 1:
                # The positive side of a "full" grid ends one step short of alpha, at
                # (2^(b-1) - 1)·Δ: widen alpha so that hi is covered too.
                top = self.alpha_steps - 1.0
                alpha = torch.maximum(lo.clamp_max(0).abs(), hi.clamp_min(0) * (self.alpha_steps / top))
                return self.qparams_from_alpha(alpha)
            return self.qparams_from_alpha(torch.maximum(lo.abs(), hi.abs()))
        lo = lo.clamp_max(0)
        hi = hi.clamp_min(0)
        scale = (hi - lo) / self.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-lo / safe).clamp(0, self.qmax)
        return scale, zp

    def value_range(self, scale: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest representable value for each block."""
        return (self.qmin - zp) * scale, (self.qmax - zp) * scale


def quantize_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    spec: GridSpec,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Map ``x`` to unsigned codes (float tensor of integers) on the grid given by scale/zp.

    ``scale`` and ``zp`` broadcast against ``x``.  Blocks with ``scale == 0`` get the code
    nearest to the zero point (they dequantize to 0).
    """
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = x / safe + zp  # (…) position on the code axis
    t = torch.where(scale > 0, t, torch.zeros_like(t) + zp)
    u = round_values(t, rounding, generator)  # codes are integers for every kind of grid
    return u.clamp(spec.qmin, spec.qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Values ``(codes - zp) * scale``."""
    return (codes.to(scale.dtype) - zp) * scale


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: GridSpec, rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize (same shape as ``x``)."""
    return dequantize_codes(quantize_codes(x, scale, zp, spec, rounding, generator), scale, zp)


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale: the whole tensor, one channel, or a group of inputs."""

    kind: str = "channel"  # "tensor" | "channel" | "group"
    axis: int = 0  # channel axis (kind="channel")
    group_size: int = 0  # inputs per group along the flattened input dimension (kind="group")

    @staticmethod
    def parse(g: "str | tuple | Granularity", axis: int = 0) -> "Granularity":
        """Accept "tensor", "channel", ("group", G), "group:G" or a Granularity."""
        if isinstance(g, Granularity):
            return g
        if isinstance(g, tuple) and len(g) == 2 and g[0] == "group":
            size = g[1]
        elif isinstance(g, str) and g.startswith("group:"):
            try:
                size = int(g.split(":", 1)[1])
            except ValueError:
                raise ValueError(
                    f"bad group granularity {g!r}; expected 'group:G' with an integer G"
                ) from None
        elif g in ("tensor", "channel"):
            return Granularity(kind=g, axis=axis)
        else:
            raise ValueError(
                f"unknown granularity {g!r}; allowed: 'tensor', 'channel', ('group', G) or 'group:G'"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"group size must be a positive integer, got {size!r}")
        return Granularity(kind="group", group_size=size)

    def label(self) -> str:
        if self.kind == "group":
            return f"group:{self.group_size}"
        return self.kind

    def blocked_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the view in which ``scale`` broadcasts (the tensor's own shape unless grouped)."""
        if self.kind != "group":
            return tuple(shape)
        out = shape[0]
        inner = math.prod(shape[1:]) if len(shape) > 1 else 1
        if len(shape) < 2:
            raise ValueError("group granularity needs a tensor with at least 2 dimensions (out, in)")
        if inner % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input dimension {inner} "
                f"(tensor shape {tuple(shape)}); choose a divisor of {inner}"
            )
        return (out, inner // self.group_size, self.group_size)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale tensor (broadcastable against ``blocked_shape``)."""
        bs = self.blocked_shape(shape)
        if self.kind == "tensor":
            return (1,) * len(bs)
        if self.kind == "channel":
            ax = self.axis % len(bs)
            return tuple(n if i == ax else 1 for i, n in enumerate(bs))
        return (bs[0], bs[1], 1)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n) matrix whose rows are the blocks sharing one scale."""
        xb = x.reshape(self.blocked_shape(tuple(x.shape)))
        if self.kind == "tensor":
            return xb.reshape(1, -1)
        if self.kind == "channel":
            ax = self.axis % xb.dim()
            return xb.movedim(ax, 0).reshape(xb.shape[ax], -1)
        return xb.reshape(-1, self.group_size)

    def rows_to_scale(self, v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Reshape a per-row vector (B,) to the broadcastable scale shape."""
        return v.reshape(self.scale_shape(shape))
