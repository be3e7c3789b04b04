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
``"fp8-e4m3"``   Δ·fp8(u): u the E4M3 bit pattern        253             0 (unused)
``"fp8-e5m2"``   Δ·fp8(u): u the E5M2 bit pattern        247             0 (unused)
===============  =====================================  ==============  =====================

The two FP8 kinds (8 bits only) are float grids, not uniform ones: a code is the bit pattern of
an 8-bit float (OCP "OFP8" formats, Micikevicius et al. 2022, "FP8 formats for deep learning":
E4M3 in its "fn" variant — no infinities, max 448, NaN 0x7F/0xFF — and E5M2 — IEEE-like, max
57344), and the value is ``scale · fp8(u)``.  Quantizing divides by the scale, rounds to the
nearest representable FP8 value (ties to even) and saturates at ±max (:func:`fp8_round`); the
scale maps the block's clipping value to the format's max (``alpha_steps`` is that max).

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

GRID_KINDS = ("narrow", "full", "midrise", "binary", "asymmetric", "fp8-e4m3", "fp8-e5m2")


@dataclass(frozen=True)
class FP8Format:
    """One 8-bit float format: its torch dtype, field widths and largest finite value."""

    name: str  # GridSpec kind, "fp8-e4m3" or "fp8-e5m2"
    dtype: torch.dtype  # torch's dtype holding exactly these values (for the bit patterns)
    mantissa_bits: int  # stored fraction bits
    min_exponent: int  # exponent of the smallest normal number (subnormals share its quantum)
    max_value: float  # largest finite value (saturation point)


FP8_FORMATS = {
    "fp8-e4m3": FP8Format("fp8-e4m3", torch.float8_e4m3fn, 3, -6, 448.0),  # OCP E4M3 "fn": no inf
    "fp8-e5m2": FP8Format("fp8-e5m2", torch.float8_e5m2, 2, -14, 57344.0),  # IEEE-like E5M2
}
FP8_LEVELS = {"fp8-e4m3": 253, "fp8-e5m2": 247}  # distinct finite values (+0 and −0 count once)


def fp8_round(t: torch.Tensor, fmt: FP8Format, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``t`` rounded to the nearest value of ``fmt`` (ties to even), saturated at ±max; same dtype.
    ``rounding="stochastic"``: to one of the two neighbouring values, unbiased (``round_values``).

    Exact in any float dtype: within a binade the representable values are the multiples of
    the quantum 2^(e − mantissa_bits) (e the binade's exponent, at least the smallest normal
    one: subnormals share its quantum), so t / quantum is exact and ``torch.round`` (half to
    even) picks the nearest; a value that rounds up into the next binade is representable too.
    """
    _, e = torch.frexp(t)  # t = m·2^e, 0.5 <= |m| < 1: the binade exponent is e − 1
    q = torch.ldexp(torch.ones_like(t), (e - 1).clamp_min(fmt.min_exponent) - fmt.mantissa_bits)
    return (round_values(t / q, rounding, generator) * q).clamp_(-fmt.max_value, fmt.max_value)


def fp8_codes(values: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """The uint8 bit patterns of ``values`` (already representable in ``fmt``)."""
    return values.float().to(fmt.dtype).view(torch.uint8)


def fp8_values(codes: torch.Tensor, fmt: FP8Format, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of the bit patterns ``codes`` (any integer-valued tensor of 0..255), in ``dtype``."""
    return codes.to(torch.uint8).view(fmt.dtype).to(dtype)
MAX_GROUP_SIZE = 2**40  # largest group size accepted (a larger one is one group per row anyway)
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


SCALE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "float16-q4_1": torch.float16}  # the dtypes a scale is stored in, by name
# Stored as float16 but kept to fewer significant bits: "float16-q4_1" scales have 7, so that z·s is
# exact in float16 for every 4-bit zero point z (GGUF's Q4_1 stores the minimum m = −z·s as float16).
SCALE_SIGNIFICANT_BITS = {"float16-q4_1": 7}


def scale_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    """The storage dtype of scales named by ``dtype`` ("float32"/"fp32", "float16"/"fp16",
    "float16-q4_1" or the torch dtype); a one-line ValueError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype in SCALE_DTYPES:
        return SCALE_DTYPES[dtype]
    raise ValueError(f"scale dtype must be 'float32' ('fp32'), 'float16' ('fp16') or 'float16-q4_1', got {dtype!r}")


def scale_dtype_name(dtype: "str | torch.dtype") -> str:
    """The canonical name of a scale dtype: "float32", "float16" or "float16-q4_1"."""
    if isinstance(dtype, str) and dtype in SCALE_SIGNIFICANT_BITS:
        return dtype
    return "float16" if scale_dtype(dtype) == torch.float16 else "float32"


def round_scale(scale: torch.Tensor, dtype: "str | torch.dtype", name: str = "scale") -> torch.Tensor:
    """``scale`` rounded to the storage dtype and returned as float32 (the values a file stores and a
    loaded model uses).  Methods round their scales with this *before* choosing codes, so that the
    codes fit the stored scales.  float16: a scale that overflows, or a non-zero one that becomes 0,
    is a one-line ValueError naming ``name`` (subnormal scales below 6.1e-5 keep fewer digits)."""
    dt = scale_dtype(dtype)
    s32 = scale.float()
    if dt == torch.float32:
        return s32
    s16 = s32.to(torch.float16)
    bad = ~torch.isfinite(s16) | ((s16 == 0) & (s32 != 0))
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name} {float(s32.reshape(-1)[i]):.3g} does not fit in float16 (overflow or underflow "
                         f"to 0); use scale dtype float32")
    keep = SCALE_SIGNIFICANT_BITS.get(dtype) if isinstance(dtype, str) else None
    if keep is None:
        return s16.float()
    m, e = torch.frexp(s16.float())  # s = m·2^e, 0.5 <= |m| < 1
    return torch.ldexp(torch.round(m * (1 << keep)) / (1 << keep), e).half().float()  # exact in float16


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
        if self.kind in FP8_FORMATS and self.bits != 8:
            raise ValueError(f"an {self.kind} grid has 8 bits, got bits={self.bits}")

    @property
    def fp8(self) -> FP8Format | None:
        """The 8-bit float format of an FP8 grid, else None."""
        return FP8_FORMATS.get(self.kind)

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
        if self.kind in FP8_LEVELS:
            return FP8_LEVELS[self.kind]
        return self.qmax - self.qmin + 1

    @property
    def symmetric_zero_point(self) -> float:
        """Zero point of a symmetric grid (fixed by its kind)."""
        if self.kind in ("narrow", "full"):
            return float(1 << (self.bits - 1))
        if self.kind in ("midrise", "binary"):
            return ((1 << self.bits) - 1) / 2.0
        if self.kind in FP8_FORMATS:
            return 0.0  # unused: an FP8 value is scale·fp8(code)
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
        if self.kind in FP8_FORMATS:
            return FP8_FORMATS[self.kind].max_value  # the clipping value maps to the format's max
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
        if self.fp8 is not None:
            return -self.fp8.max_value * scale, self.fp8.max_value * scale
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
    nearest to the zero point (they dequantize to 0).  FP8 grids: the bit patterns of the
    FP8 values of x / scale (``zp`` unused).
    """
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.fp8 is not None:
        v = torch.where(scale > 0, fp8_round(x / safe, spec.fp8, rounding, generator), torch.zeros_like(x))
        return fp8_codes(v, spec.fp8).to(x.dtype)
    t = x / safe + zp  # (…) position on the code axis
    t = torch.where(scale > 0, t, torch.zeros_like(t) + zp)
    u = round_values(t, rounding, generator)  # codes are integers for every kind of grid
    return u.clamp(spec.qmin, spec.qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                     spec: GridSpec | None = None) -> torch.Tensor:
    """Values ``(codes - zp) * scale`` (FP8 grids: ``fp8(codes) * scale``)."""
    if spec is not None and spec.fp8 is not None:
        return fp8_values(codes, spec.fp8, scale.dtype) * scale
    return (codes.to(scale.dtype) - zp) * scale


def round_on_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: GridSpec, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The grid value of ``w`` (same shape) with step ``s`` and zero point ``z`` (broadcasting), 0 where
    ``s == 0``: what the error-feedback methods (GPTQ, GPFQ, Qronos, SPFQ) round each column to.
    Uniform grids: (clamp(round(w/s + z)) − z)·s; FP8 grids: s·fp8(w/s), saturated at ±max."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if spec.fp8 is not None:
        q = fp8_round(w / safe, spec.fp8, rounding, generator) * s
    else:
        c = round_values(w / safe + z, rounding, generator).clamp(spec.qmin, spec.qmax)
        q = (c - z) * s
    return torch.where(s > 0, q, torch.zeros_like(w))


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: GridSpec, rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize (same shape as ``x``)."""
    return dequantize_codes(quantize_codes(x, scale, zp, spec, rounding, generator), scale, zp, spec)


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale: the whole tensor, one channel, or a group of inputs.

    Groups run along the flattened input dimension N0 = in·kh·kw of the (out, N0) view: group
    j of a row holds inputs j·G … j·G + G − 1.  When G does not divide N0 the last group is
    shorter (N0 mod G inputs) and, like every group, has its own scale and zero point computed
    from its own weights only: a row has ceil(N0 / G) groups, the scale shape is
    (out, ceil(N0 / G), 1).  (Brevitas instead pads the row with zeros to a multiple of G and
    takes its statistics over the padded group.  With specquant's calibrators a range always
    contains 0, so for min/max the two agree; statistics that count the padding — percentiles,
    ACIQ's spread, the binary grid's mean |w| — differ, and so does Brevitas' min/max scale of
    a last group whose weights are all positive (older AbsMinMax) or all negative (newer
    AbsMinMax, which clamps only the minimum), where the padded zeros widen the range.)

    Element-wise work on the blocks goes through ``to_blocks`` / ``from_blocks``, which pad the
    last group (the padding is cut off again, it never reaches a statistic or a stored code);
    per-block statistics go through ``row_parts`` / ``scale_from_parts``.
    """

    kind: str = "channel"  # "tensor" | "channel" | "group"
    axis: int = 0  # channel axis (kind="channel")
    group_size: int = 0  # inputs per group along the flattened input dimension (kind="group"); the last may be shorter

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
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_GROUP_SIZE:
            raise ValueError(f"group size must be a positive integer up to 2^40, got {str(size)[:40]}")
        return Granularity(kind="group", group_size=size)

    def label(self) -> str:
        if self.kind == "group":
            return f"group:{self.group_size}"
        return self.kind

    def _rows_inner(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(out, N0) of a grouped tensor's (out, N0) view."""
        if len(shape) < 2:
            raise ValueError("group granularity needs a tensor with at least 2 dimensions (out, in)")
        return shape[0], math.prod(shape[1:])

    def num_groups(self, shape: tuple[int, ...]) -> int:
        """Groups per row, ceil(N0 / G) (kind "group" only)."""
        _, inner = self._rows_inner(tuple(shape))
        return -(-inner // self.group_size)

    def group_len(self, shape: tuple[int, ...]) -> int:
        """Inputs in a full group: min(G, N0) (a group larger than the row is the whole row)."""
        _, inner = self._rows_inner(tuple(shape))
        return min(self.group_size, inner)

    def last_group_size(self, shape: tuple[int, ...]) -> int:
        """Inputs in the last group of a row: G, or N0 mod G when G does not divide N0."""
        _, inner = self._rows_inner(tuple(shape))
        return inner - (self.num_groups(shape) - 1) * self.group_size

    def is_ragged(self, shape: tuple[int, ...]) -> bool:
        """Whether the last group of each row is shorter than the others (G < N0 does not divide N0)."""
        return self.kind == "group" and self.last_group_size(shape) != self.group_len(shape)

    def blocked_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the view in which ``scale`` broadcasts (the tensor's own shape unless grouped).

        Grouped: (out, ceil(N0 / G), min(G, N0)).  When G < N0 does not divide N0 this view is
        padded (the last group's N0 mod G inputs, then fewer than G pads): reach it with
        ``to_blocks``, not a reshape."""
        if self.kind != "group":
            return tuple(shape)
        out, _ = self._rows_inner(tuple(shape))
        return (out, self.num_groups(shape), self.group_len(shape))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scale tensor (broadcastable against ``blocked_shape``)."""
        bs = self.blocked_shape(shape)
        if self.kind == "tensor":
            return (1,) * len(bs)
        if self.kind == "channel":
            ax = self.axis % len(bs)
            return tuple(n if i == ax else 1 for i, n in enumerate(bs))
        return (bs[0], bs[1], 1)

    def to_blocks(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``x`` in ``blocked_shape(x.shape)``; a shorter last group is padded with ``fill``
        (the padding takes part only in element-wise work and ``from_blocks`` cuts it off)."""
        shape = tuple(x.shape)
        blocked = self.blocked_shape(shape)
        if not self.is_ragged(shape):
            return x.reshape(blocked)
        out, inner = self._rows_inner(shape)
        x2 = x.reshape(out, inner)  # (out, N0)
        pad = x2.new_full((out, blocked[1] * blocked[2] - inner), fill)  # (out, padding)
        return torch.cat([x2, pad], dim=1).reshape(blocked)  # (out, groups, G)

    def from_blocks(self, xb: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of ``to_blocks``: blocked values back in ``shape``, padding dropped."""
        shape = tuple(shape)
        if not self.is_ragged(shape):
            return xb.reshape(shape)
        out, inner = self._rows_inner(shape)
        return xb.reshape(out, -1)[:, :inner].reshape(shape)  # (out, N0) → shape

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n) matrix whose rows are the blocks sharing one scale (every block the same length;
        groups with a shorter last one: use ``row_parts``)."""
        if self.is_ragged(tuple(x.shape)):
            raise ValueError(f"group size {self.group_size} leaves a shorter last group in a tensor of shape "
                             f"{tuple(x.shape)}: its blocks are not one matrix (use row_parts)")
        xb = x.reshape(self.blocked_shape(tuple(x.shape)))
        if self.kind == "tensor":
            return xb.reshape(1, -1)
        if self.kind == "channel":
            ax = self.axis % xb.dim()
            return xb.movedim(ax, 0).reshape(xb.shape[ax], -1)
        return xb.reshape(-1, xb.shape[-1])  # (out·groups, min(G, N0))

    def row_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The blocks sharing one scale as (B_k, n_k) matrices of equal-length blocks: ``[to_rows(x)]``,
        or, when the last group of each row is shorter, the full groups (out·(groups − 1), G) and
        the last groups (out, N0 mod G).  Read the per-block results back with ``scale_from_parts``."""
        shape = tuple(x.shape)
        if not self.is_ragged(shape):
            return [self.to_rows(x)]
        out, inner = self._rows_inner(shape)
        x2 = x.reshape(out, inner)  # (out, N0)
        cut = (self.num_groups(shape) - 1) * self.group_size  # inputs in full groups
        parts = [x2[:, :cut].reshape(-1, self.group_size)] if cut else []  # (out·(groups−1), G)
        return parts + [x2[:, cut:]]  # + (out, N0 mod G)

    def scale_from_parts(self, values: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """One value per block, given as (B_k,) vectors in the order of ``row_parts``, in the scale's shape."""
        shape = tuple(shape)
        if not self.is_ragged(shape):
            (v,) = values
            return self.rows_to_scale(v, shape)
        out, _ = self._rows_inner(shape)
        cols = [v.reshape(out, -1) for v in values]  # (out, groups − 1) and (out, 1)
        return torch.cat(cols, dim=1).reshape(self.scale_shape(shape))

    def per_entry(self, t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """A scale or zero point of a 2-D (out, N0) tensor expanded to one value per entry (out, N0)."""
        out, n = shape
        if self.kind == "group":
            per_group = t.reshape(out, -1)  # (out, groups)
            return per_group.repeat_interleave(min(self.group_size, n), dim=1)[:, :n]  # (out, N0)
        return t.reshape(-1, 1).expand(out, n) if t.numel() == out else t.reshape(1, 1).expand(out, n)

    def rows_to_scale(self, v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Reshape a per-row vector (B,) to the broadcastable scale shape."""
        return v.reshape(self.scale_shape(shape))
