"""The result of quantizing one tensor: integer codes, the grid that gives them values, and the
``Layout`` that stores them (``core.layouts``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specquant.core.frames import make_frame
from specquant.core.grid import Granularity, GridSpec, dequantize_codes, scale_dtype
from specquant.core.layouts import FrameLayout, Layout, RowsLayout, grid_layout

ZERO_POINT_BITS = {"implicit": 0, "uint8": 8, "float32": 32}  # stored bits per zero point, by storage kind


def zero_point_storage(spec: GridSpec, zero_point: torch.Tensor) -> str:
    """How a file stores these zero points: "implicit" when the grid is symmetric and every zero point
    is its fixed one (nothing stored), "uint8" when they are integers in 0..255 (asymmetric grids), else
    "float32" (e.g. the half-integer zero points of binary rows in a mixed-width layer)."""
    if spec.symmetric and bool(torch.all(zero_point == spec.symmetric_zero_point)):
        return "implicit"
    return "uint8" if integer_zero_points(zero_point) else "float32"


def integer_zero_points(zero_point: torch.Tensor) -> bool:
    """Whether every zero point is an integer in 0..255 (a file stores them as uint8)."""
    return bool(((zero_point >= 0) & (zero_point <= 255) & (zero_point == zero_point.round())).all())


@dataclass
class QuantizedWeight:
    """Codes, scales and zero points of one quantized tensor, and the layout that stores the codes.

    ``codes`` are unsigned integers in ``[spec.qmin, spec.qmax]`` stored as uint8 in the
    tensor's own shape (packing into bytes happens only when saving or in ``specquant.nn``,
    through ``layout``).  ``scale`` and ``zero_point`` broadcast against
    ``granularity.blocked_shape(shape)``.

    ``layout`` defaults to the grid's own (``core.layouts.grid_layout``: bits, or trits for a
    3-level grid); mixed per-row widths pass a ``RowsLayout``.  A layout given for another
    shape is refitted to the codes' (``Layout.for_shape``: a reshaped or concatenated weight
    keeps its layout), and it is checked against the grid and granularity (ValueError).
    """

    codes: torch.Tensor  # uint8, same shape as the original tensor
    scale: torch.Tensor  # float32, granularity.scale_shape(shape)
    zero_point: torch.Tensor  # float32, same shape as scale (half-integers for mid-rise grids)
    spec: GridSpec  # grid kind and bits
    granularity: Granularity  # which elements share a scale
    dtype: torch.dtype = torch.float32  # dtype of the original tensor, restored by dequantize()
    algorithm: str = "rtn"  # name of the method that chose the codes
    info: dict = field(default_factory=dict)  # method settings worth recording (JSON-able values)
    layout: Layout | None = None  # how the codes are stored (core.layouts); None: the grid's own
    scale_dtype: torch.dtype = torch.float32  # storage dtype of the scales (float32 or float16); exact in it

    def __post_init__(self) -> None:
        shape = tuple(self.codes.shape)
        if self.layout is None:
            self.layout = grid_layout(self.spec, shape)
        elif self.layout.shape != shape:
            self.layout = self.layout.for_shape(shape)
        self.layout.validate(spec=self.spec, granularity=self.granularity, weight_shape=shape)
        self._check_scale_dtype()

    def _check_scale_dtype(self) -> None:
        """``scale_dtype`` is float32 or float16, and every scale is exact in it (ValueError)."""
        self.scale_dtype = scale_dtype(self.scale_dtype)
        if self.scale_dtype == torch.float16 and not torch.equal(self.scale.float(), self.scale.half().float()):
            raise ValueError("the scales are not exact in float16, their storage dtype: round them with "
                             "core.grid.round_scale before choosing the codes")

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def levels(self) -> int:
        return self.spec.levels

    @property
    def row_bits(self) -> torch.Tensor | None:
        """(out,) uint8 width of each output row when rows mix widths (a ``RowsLayout``), else None."""
        return self.layout.row_bits if isinstance(self.layout, RowsLayout) else None

    def code_bits(self) -> float:
        """Stored bits of the codes alone (ternary codes at 1.6 bits, mixed rows at their widths)."""
        return float(self.layout.code_bits())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """Float tensor of the original shape and dtype."""
        g = self.granularity
        c = g.to_blocks(self.codes)  # blocked_shape (a shorter last group padded, cut off below)
        return g.from_blocks(dequantize_codes(c, self.scale, self.zero_point, self.spec), self.shape).to(self.dtype)

    def num_weights(self) -> int:
        return self.codes.numel()

    def storage_bits(self, scale_bits: int | None = None, zero_point_bits: int | None = None) -> int:
        """True storage, as ``specquant.save`` writes the layer by default: code bits (ternary 1.6 per
        code), one scale per block at ``scale_dtype`` (16 or 32 bits), one zero point per block when
        the file stores them (``zero_point_storage``: none when the symmetric grid fixes them, 8
        bits as uint8, else 32), and the layout's own tensors (one width byte per row for mixed rows).

        ``scale_bits`` / ``zero_point_bits`` count the scales / the stored zero points at another
        width instead, e.g. ``(16, 16)`` for the "fp16 scale and fp16 zero point" convention of
        papers (4-bit, groups of 128, asymmetric: 4 + 32/128 = 4.25 bits per weight; the file's
        uint8 zero points make it 4 + 24/128 = 4.1875 with float16 scales)."""
        if scale_bits is None:
            scale_bits = 8 * torch.empty(0, dtype=self.scale_dtype).element_size()
        kind = zero_point_storage(self.spec, self.zero_point)
        if kind == "implicit":
            zero_point_bits = 0
        elif zero_point_bits is None:
            zero_point_bits = ZERO_POINT_BITS[kind]
        n = self.scale.numel()
        return round(self.layout.code_bits()) + n * (scale_bits + zero_point_bits) + self.layout.extra_bits()

    def bits_per_weight(self, scale_bits: int | None = None, zero_point_bits: int | None = None) -> float:
        """``storage_bits`` per weight of the original tensor."""
        return self.storage_bits(scale_bits, zero_point_bits) / max(1, self.num_weights())


@dataclass(kw_only=True)
class FrameQuantizedWeight(QuantizedWeight):
    """ΣΔ codes of the frame coefficients of a tensor, and what is needed to rebuild it.

    ``codes`` is uint8 (N, M): column m holds the N codes of the m-th quantized vector (M = out
    for ``along="input"``, M = in·kh·kw for ``along="output"``, 1 for a bias).  ``scale`` is δ,
    (1, M) or (1, 1), and ``zero_point`` = K − ½, so the inherited grid decodes codes to the ΣΔ
    alphabet values (``coefficients()``).  ``dequantize()`` rebuilds the frame and returns the
    weights in their original shape; ``shape`` is that original shape.  ``layout`` is the
    ``FrameLayout`` made from the frame fields below (any layout passed in is replaced).
    """

    weight_shape: tuple  # shape of the original tensor, restored by dequantize()
    frame_kind: str  # "harmonic" or "random"
    frame_dim: int  # d, length of each quantized vector
    frame_size: int  # N, number of frame vectors (codes per vector)
    frame_seed: int  # seed of a random frame (unused for harmonic frames)
    order: int  # Sigma-Delta order used to choose the codes
    along: str  # "input" (rows of the (out, d) view), "output" (its columns) or "bias"

    def __post_init__(self) -> None:
        self.layout = FrameLayout(self.spec.bits, tuple(self.codes.shape), frame_kind=self.frame_kind,
                                  dim=self.frame_dim, size=self.frame_size, seed=self.frame_seed,
                                  order=self.order, along=self.along)
        self.layout.validate(spec=self.spec, granularity=self.granularity, weight_shape=tuple(self.weight_shape))
        self._check_scale_dtype()

    @classmethod
    def from_layout(cls, layout: FrameLayout, codes: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor, *, spec: GridSpec, granularity: Granularity,
                    weight_shape: tuple, dtype: torch.dtype = torch.float32, algorithm: str = "frame",
                    info: dict | None = None, scale_dtype: torch.dtype = torch.float32) -> FrameQuantizedWeight:
        """The frame-quantized weight whose frame fields are ``layout``'s."""
        return cls(codes=codes, scale=scale, zero_point=zero_point, spec=spec, granularity=granularity,
                   dtype=dtype, algorithm=algorithm, info=dict(info or {}), scale_dtype=scale_dtype,
                   weight_shape=tuple(weight_shape),
                   frame_kind=layout.frame_kind, frame_dim=layout.dim, frame_size=layout.size,
                   frame_seed=layout.seed, order=layout.order, along=layout.along)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight_shape)

    @property
    def redundancy(self) -> float:
        return self.frame_size / self.frame_dim

    def frame(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (d, N) frame the codes refer to (rebuilt, never stored)."""
        return make_frame(self.frame_kind, self.frame_dim, self.frame_size, self.frame_seed, dtype)

    def coefficients(self) -> torch.Tensor:
        """Quantized frame coefficients q (N, M), float64."""
        return (self.codes.to(torch.float64) - self.zero_point.double()) * self.scale.double()

    def dequantize(self) -> torch.Tensor:
        d, N = self.frame_dim, self.frame_size
        V = (self.frame() @ self.coefficients()) * (d / N)  # (d, M) canonical-dual synthesis
        if self.along == "output":
            W = V  # columns of the (out, in·kh·kw) view
        else:
            W = V.transpose(0, 1)  # rows (a bias is one row)
        return W.reshape(self.shape).to(self.dtype)

    def num_weights(self) -> int:
        return math.prod(self.weight_shape)


def from_stored(layout: Layout, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *,
                spec: GridSpec, granularity: Granularity, weight_shape: tuple, dtype: torch.dtype = torch.float32,
                algorithm: str = "rtn", info: dict | None = None,
                scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """The quantized weight of stored parts: a ``FrameQuantizedWeight`` for a ``FrameLayout``,
    else a ``QuantizedWeight`` with ``layout`` (its codes in the weight's shape).  ``scale_dtype``:
    the dtype the scales were stored in (``scale`` itself is float32)."""
    if isinstance(layout, FrameLayout):
        return FrameQuantizedWeight.from_layout(layout, codes, scale, zero_point, spec=spec, granularity=granularity,
                                                weight_shape=weight_shape, dtype=dtype, algorithm=algorithm, info=info,
                                                scale_dtype=scale_dtype)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero_point, spec=spec, granularity=granularity,
                           dtype=dtype, algorithm=algorithm, info=dict(info or {}), layout=layout,
                           scale_dtype=scale_dtype)
