"""Storage layouts: how a quantized weight's integer codes are stored, one class per layout.

A ``Layout`` is the one place a stored form is defined.  It holds the shape of the codes it
stores (and whatever else it needs to store them) and

* turns the uint8 codes into a flat uint8 byte tensor and back: ``pack``, ``unpack``, ``nbytes``;
* says what the codes cost: ``code_bits()`` (exact, 8/5 per ternary code) and ``extra_bits()``
  (its own tensors, e.g. one width byte per row);
* names what it adds to a saved layer: ``to_record()`` (header fields) and ``tensors()``
  (extra tensors, saved as ``<layer>.<name>``), and reads them back: ``Layout.from_record``,
  which picks the class from the record through the table below;
* checks itself against a layer: ``validate`` raises a one-line ValueError naming the problem
  (the grid does not fit, the weight shape does not fit, the packed bytes have the wrong size).

``core.pack`` holds the low-level bit and trit packers the layouts are built from.

===============  =============================================  ==================================
layout           bytes                                          record fields (+ tensors)
===============  =============================================  ==================================
``BitsLayout``   every code at ``bits`` bits (``core.pack``)     kind "uniform", packing "bits"
``TritsLayout``  a 3-level grid's codes five per byte (1.6 bits)  kind "uniform", packing "trits"
``RowsLayout``   each output row at its own width: for each       kind "uniform", packing "rows",
                 width in increasing order, the rows of that      + ``row_bits`` uint8 (out,)
                 width (in row order) in the layout of that
                 width's default grid; the segments concatenated
``FP8Layout``    one byte per code, the FP8 bit pattern itself       kind "uniform", packing "fp8"
                 (E4M3 / E5M2; the grid says which); no NaN/inf
                 pattern accepted
``FrameLayout``  ΣΔ codes of frame coefficients, shape (N, M),    kind "frame", packing "bits",
                 bit packed                                       "frame" {kind, dim, size, seed,
                                                                  order, along}, "codes_shape"
===============  =============================================  ==================================

"kind" in a record is the *weight kind* (``Layout.weight_kind``: "uniform" codes are the
weight's own entries, "frame" codes are frame coefficients); "packing" is the byte layout's
record name (``Layout.packing``; frame coefficients are bit packed, so a FrameLayout writes
"bits").  The pair picks the class (``register_layout``).

Adding a layout — a new stored field, a permutation tensor, ... — is one subclass: its
parameters, the methods above, and ``register_layout(cls)``.  The file format, the packed
layers and ``QuantizedWeight`` use layouts through this interface (tests/core/test_layouts.py
round-trips a layer through save/load with a layout defined in the test); two conveniences
name a class: ``QuantizedWeight.row_bits`` (a ``RowsLayout``'s widths, for reports) and
``core.qweight.from_stored`` (a ``FrameLayout`` rebuilds a ``FrameQuantizedWeight``).
Layouts are values: treat them as immutable (``for_shape`` returns a new one).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import torch

from specquant.core.frames import FRAME_KINDS
from specquant.core.grid import Granularity, GridSpec, check_bits
from specquant.core.pack import TRITS_PER_BYTE, pack, pack_trits, packed_nbytes, trits_nbytes, unpack, unpack_trits
from specquant.core.sigma_delta import SD_ORDERS


def _at(layer: str) -> str:
    """Message prefix naming the layer, when known."""
    return f"layer '{layer}': " if layer else ""


def _label(layer: str, suffix: str) -> str:
    """A layer tensor's name as the file spells it (``'fc1.row_bits'``)."""
    return f"'{layer}.{suffix}'" if layer else f"'{suffix}'"


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_shape(shape, what: str = "codes shape") -> tuple[int, ...]:
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if dims is None or not all(_is_int(d, 0, 2**62) for d in dims):
        raise ValueError(f"{what} must be a tuple of non-negative integers, got {shape!r}")
    return dims


def _describe_tensor(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


class Layout:
    """How the codes of one quantized tensor are stored (see the module docstring).

    Subclasses set the class attributes below and implement the methods that raise
    NotImplementedError; ``__init__`` checks the layout's own parameters (one-line ValueError).
    """

    name: ClassVar[str] = ""  # the layout in code and messages
    weight_kind: ClassVar[str] = "uniform"  # the record's "kind": "uniform" codes are the weight's entries
    packing: ClassVar[str] = ""  # the record's "packing"
    tensor_names: ClassVar[tuple[str, ...]] = ()  # extra tensors it stores, saved as "<layer>.<name>"
    codes_are_weights: ClassVar[bool] = True  # codes are the weight's own entries, in its shape
    cheap_row_slices: ClassVar[bool] = False  # unpack_rows cuts rows without unpacking the rest (a subclass
    #                                           that stores rows its own way sets it False again)

    shape: tuple[int, ...]  # shape of the codes it stores

    # ---- storage -------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def identity_bytes(self) -> bool:
        """Whether ``pack`` is the identity: one byte per code, in the codes' order (8-bit codes)."""
        return False

    def nbytes(self) -> int:
        """Bytes of the packed codes."""
        raise NotImplementedError

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 ``codes`` of ``shape`` → the packed bytes (1-D uint8, ``nbytes()`` long)."""
        raise NotImplementedError

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: uint8 codes of ``shape``."""
        raise NotImplementedError

    def unpack_rows(self, data: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Codes of rows ``r0:r1`` (first axis).  Here: unpack all, then slice; a layout with
        ``cheap_row_slices`` cuts the rows out of the bytes instead."""
        return self.unpack(data)[r0:r1]

    def code_bits(self) -> Fraction:
        """Stored bits of the codes, exactly (ternary codes at 8/5 each, rows at their widths)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The extra tensors it stores, by name (``tensor_names``)."""
        return {}

    def extra_bits(self) -> int:
        """Bits of its extra tensors (e.g. one width byte per row)."""
        return 8 * sum(t.numel() * t.element_size() for t in self.tensors().values())

    def for_shape(self, shape) -> Layout:
        """The same layout for codes of ``shape`` (a reshaped or concatenated weight), or a ValueError."""
        raise NotImplementedError

    # ---- records -------------------------------------------------------------------------

    def to_record(self) -> dict:
        """The header fields it adds to a layer's record."""
        return {"kind": self.weight_kind, "packing": self.packing}

    @classmethod
    def from_record(cls, record: dict, tensors: dict[str, torch.Tensor], *, spec: GridSpec,
                    weight_shape: tuple[int, ...], layer: str = "") -> Layout:
        """The layout a (untrusted) layer record describes.

        ``Layout.from_record`` picks the class from the record's "kind" and "packing" (the table
        of :func:`register_layout`); a subclass reads its own fields.  ``tensors``: the layer's
        extra tensors by name (``row_bits``, ...); ``spec`` and ``weight_shape``: the layer's grid
        and weight shape, already read from the record; ``layer``: its name, for messages.
        Raises a one-line ValueError for a bad record.
        """
        target = layout_class(record, layer)
        if cls is not Layout and not issubclass(target, cls):
            raise ValueError(f"{_at(layer)}the record describes a {target.name} layout, not {cls.name}")
        return target._from_record(record, tensors, spec, tuple(weight_shape), layer)

    @classmethod
    def _from_record(cls, record: dict, tensors: dict, spec: GridSpec, weight_shape: tuple[int, ...],
                     layer: str) -> Layout:
        raise NotImplementedError

    # ---- checks --------------------------------------------------------------------------

    def validate(self, data: torch.Tensor | None = None, *, spec: GridSpec | None = None,
                 granularity: Granularity | None = None, weight_shape: tuple[int, ...] | None = None,
                 layer: str = "") -> None:
        """Raise a one-line ValueError if the layout does not fit what is given: the grid
        (``spec``), the scales' ``granularity``, the weight's shape, or the packed ``data``
        (a 1-D uint8 tensor of ``nbytes()`` bytes).  Subclasses add their own checks."""
        if weight_shape is not None and self.codes_are_weights and tuple(weight_shape) != self.shape:
            raise ValueError(f"{_at(layer)}codes of shape {self.shape} do not fit a weight of shape "
                             f"{tuple(weight_shape)}")
        if data is not None:
            need = self.nbytes()
            if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.dim() == 1
                    and data.numel() == need):
                raise ValueError(f"{_label(layer, 'codes')} is {_describe_tensor(data)}, expected uint8 ({need},) "
                                 f"for {self.numel} codes in {self!r}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            raise ValueError(f"codes must be a uint8 tensor, got {_describe_tensor(codes)}")
        if tuple(codes.shape) != self.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit {self!r}")

    # ---- values --------------------------------------------------------------------------

    def _params(self) -> dict:
        """The parameters that define it (equality and repr)."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._params() == self._params()

    __hash__ = None  # mutable-looking values with tensors: not hashable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._params().items())})"


class BitsLayout(Layout):
    """Every code at ``bits`` bits, contiguous across byte boundaries (``core.pack.pack``)."""

    name = "bits"
    packing = "bits"
    cheap_row_slices = True

    def __init__(self, bits: int, shape) -> None:
        self.bits = check_bits(bits)
        self.shape = _check_shape(shape)

    @property
    def identity_bytes(self) -> bool:
        return self.bits == 8

    def nbytes(self) -> int:
        return packed_nbytes(self.numel, self.bits)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        return pack(codes, self.bits)

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        return unpack(data, self.bits, self.numel).reshape(self.shape)

    def unpack_rows(self, data: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        row_len = self.numel // self.shape[0] if self.shape and self.shape[0] else 0
        start = r0 * row_len * self.bits
        if start % 8 or not self.cheap_row_slices:  # r0 starts inside a byte, or a subclass stores rows its way
            return super().unpack_rows(data, r0, r1)
        rows = unpack(data.reshape(-1)[start // 8:], self.bits, (r1 - r0) * row_len)
        return rows.reshape(r1 - r0, *self.shape[1:])

    def code_bits(self) -> Fraction:
        return Fraction(self.numel * self.bits)

    def for_shape(self, shape) -> Layout:
        return BitsLayout(self.bits, shape)

    @classmethod
    def _from_record(cls, record, tensors, spec, weight_shape, layer) -> Layout:
        return cls(spec.bits, weight_shape)

    def validate(self, data=None, *, spec=None, granularity=None, weight_shape=None, layer="") -> None:
        if spec is not None and spec.bits != self.bits:
            raise ValueError(f"{_at(layer)}the layout packs {self.bits}-bit codes, the grid has {spec.bits} bits")
        if spec is not None and spec.fp8 is not None and type(self) is BitsLayout:
            raise ValueError(f"{_at(layer)}an {spec.kind} grid's codes are stored with 'fp8' packing, not 'bits'")
        super().validate(data, spec=spec, granularity=granularity, weight_shape=weight_shape, layer=layer)

    def _params(self) -> dict:
        return {"bits": self.bits, "shape": self.shape}


class TritsLayout(Layout):
    """A 3-level grid's codes (the narrow 2-bit grid: codes 1, 2, 3) five per byte, 1.6 bits each.

    Byte k holds codes 5k … 5k+4 as the base-3 number Σ_j (u_{5k+j} − 1)·3^j
    (``core.pack.pack_trits``), the last byte padded with zero digits.
    """

    name = "trits"
    packing = "trits"
    qmin: ClassVar[int] = 1  # smallest code of the 3-level grid: the stored digit is code − qmin

    def __init__(self, shape) -> None:
        self.shape = _check_shape(shape)

    def nbytes(self) -> int:
        return trits_nbytes(self.numel)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        if codes.numel() and bool((codes < self.qmin).any()):
            raise ValueError(f"a ternary code lies below the grid's smallest code {self.qmin}")
        return pack_trits(codes - self.qmin)

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        return (unpack_trits(data, self.numel) + self.qmin).reshape(self.shape)

    def code_bits(self) -> Fraction:
        return Fraction(8, TRITS_PER_BYTE) * self.numel

    def for_shape(self, shape) -> Layout:
        return TritsLayout(shape)

    @classmethod
    def _from_record(cls, record, tensors, spec, weight_shape, layer) -> Layout:
        return cls(weight_shape)

    def validate(self, data=None, *, spec=None, granularity=None, weight_shape=None, layer="") -> None:
        if spec is not None and not (spec.levels == 3 and spec.bits == 2 and spec.qmin == self.qmin):
            raise ValueError(f"{_at(layer)}'trits' packing on a {spec.levels}-level grid (five codes per byte "
                             f"hold only 3-level 2-bit grids)")
        super().validate(data, spec=spec, granularity=granularity, weight_shape=weight_shape, layer=layer)

    def _params(self) -> dict:
        return {"shape": self.shape}


class FP8Layout(Layout):
    """FP8 codes (``GridSpec`` kinds "fp8-e4m3", "fp8-e5m2"): one byte per weight, the 8-bit float's
    bit pattern, in the codes' order.  The bytes are not shifted (unlike 8-bit integer codes, which
    the packed layers keep as u − 128), and a code that is NaN or ±inf in the grid's format is refused."""

    name = "fp8"
    packing = "fp8"
    cheap_row_slices = True

    def __init__(self, shape) -> None:
        self.shape = _check_shape(shape)

    def nbytes(self) -> int:
        return self.numel

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        return codes.reshape(-1).clone()

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        return data.reshape(self.shape)

    def unpack_rows(self, data: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        row_len = self.numel // self.shape[0] if self.shape and self.shape[0] else 0
        return data.reshape(-1)[r0 * row_len:r1 * row_len].reshape(r1 - r0, *self.shape[1:])

    def code_bits(self) -> Fraction:
        return Fraction(8 * self.numel)

    def for_shape(self, shape) -> Layout:
        return FP8Layout(shape)

    @classmethod
    def _from_record(cls, record, tensors, spec, weight_shape, layer) -> Layout:
        return cls(weight_shape)

    def validate(self, data=None, *, spec=None, granularity=None, weight_shape=None, layer="") -> None:
        if spec is not None and spec.fp8 is None:
            raise ValueError(f"{_at(layer)}'fp8' packing on a {spec.kind} grid (it holds FP8 codes only)")
        super().validate(data, spec=spec, granularity=granularity, weight_shape=weight_shape, layer=layer)
        if data is not None and spec is not None and data.numel():
            finite = torch.isfinite(data.view(spec.fp8.dtype).float())  # (nbytes,)
            if not bool(finite.all()):
                i = int(torch.nonzero(~finite)[0])
                raise ValueError(f"{_label(layer, 'codes')} byte {i} (0x{int(data[i]):02x}) is not a finite "
                                 f"{spec.kind} value")

    def _params(self) -> dict:
        return {"shape": self.shape}


def grid_layout(spec: GridSpec, shape) -> Layout:
    """A grid's own layout for codes of ``shape``: FP8 bit patterns for FP8 grids, trits for 3-level
    2-bit grids, else bits."""
    if spec.fp8 is not None:
        return FP8Layout(shape)
    if spec.levels == 3 and spec.bits == 2:
        return TritsLayout(shape)
    return BitsLayout(spec.bits, shape)


def grid_code_bits(spec: GridSpec) -> Fraction:
    """Stored bits per code of a grid in its own layout (8/5 for 3-level grids, else ``bits``)."""
    return grid_layout(spec, (1,)).code_bits()


class RowsLayout(Layout):
    """Each output row (first axis) at its own width on the default grid of that width.

    For each width b present, in increasing order, the rows of width b (in row order) are
    stored in the layout of ``GridSpec.default(b, symmetric)`` (trits for the 3-level 2-bit
    grid, else bits); the segments are concatenated.  The widths are stored as the
    ``row_bits`` tensor (uint8, one byte per row), and the zero points are stored (rows of
    different widths have different ones; ``core.qweight.zero_point_storage``).
    """

    name = "rows"
    packing = "rows"
    tensor_names = ("row_bits",)

    def __init__(self, row_bits, shape, symmetric: bool = True) -> None:
        raw = row_bits.tolist() if isinstance(row_bits, torch.Tensor) else list(row_bits)
        for b in raw:
            check_bits(b, "row width")
        self.widths = tuple(raw)  # width of each row
        self.shape = _check_shape(shape)
        if not self.shape or self.shape[0] != len(self.widths):
            raise ValueError(f"row_bits has {len(self.widths)} widths for {self.shape[0] if self.shape else 0} rows")
        self.symmetric = bool(symmetric)  # the rows' grids: GridSpec.default(width, symmetric)
        self.row_bits = torch.tensor(self.widths, dtype=torch.uint8)  # (out,)

    @property
    def row_len(self) -> int:
        return self.numel // self.shape[0] if self.shape[0] else 0

    def _segments(self):
        """(rows of the segment as a bool mask (out,), the segment's layout) for each width, ascending."""
        for b in sorted(set(self.widths)):
            sel = self.row_bits == b
            yield sel, grid_layout(GridSpec.default(b, self.symmetric), (self.widths.count(b), self.row_len))

    @property
    def identity_bytes(self) -> bool:
        return set(self.widths) == {8}

    def nbytes(self) -> int:
        return sum(seg.nbytes() for _, seg in self._segments())

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        self._check_codes(codes)
        c2 = codes.reshape(len(self.widths), -1)  # (out, n)
        parts = [seg.pack(c2[sel.to(c2.device)].contiguous()) for sel, seg in self._segments()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=codes.device)

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
            raise ValueError(f"data must be a uint8 tensor, got {_describe_tensor(data)}")
        flat = data.reshape(-1)
        need = self.nbytes()
        if flat.numel() < need:
            raise ValueError(f"data holds {flat.numel()} byte(s) but the rows need {need}")
        out = torch.empty(len(self.widths), self.row_len, dtype=torch.uint8, device=flat.device)  # (out, n)
        pos = 0
        for sel, seg in self._segments():
            nb = seg.nbytes()
            out[sel.to(flat.device)] = seg.unpack(flat[pos:pos + nb])
            pos += nb
        return out.reshape(self.shape)

    def code_bits(self) -> Fraction:
        return sum((seg.code_bits() for _, seg in self._segments()), Fraction(0))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"row_bits": self.row_bits}

    def for_shape(self, shape) -> Layout:
        return RowsLayout(self.widths, shape, self.symmetric)

    @classmethod
    def _from_record(cls, record, tensors, spec, weight_shape, layer) -> Layout:
        rb = tensors.get("row_bits")
        rows = weight_shape[0] if weight_shape else 0
        if not (isinstance(rb, torch.Tensor) and rb.dtype == torch.uint8 and tuple(rb.shape) == (rows,)):
            raise ValueError(f"{_label(layer, 'row_bits')} should be uint8 ({rows},), got "
                             f"{'nothing' if rb is None else _describe_tensor(rb)}")
        if not (rows and bool(((rb >= 1) & (rb <= 8)).all()) and int(rb.max()) == spec.bits):
            raise ValueError(f"{_label(layer, 'row_bits')} must hold widths in 1..8 whose largest is the layer's "
                             f"{spec.bits} bits")
        return cls(rb, weight_shape, spec.symmetric)

    def validate(self, data=None, *, spec=None, granularity=None, weight_shape=None, layer="") -> None:
        if spec is not None and self.widths:
            top = max(self.widths)
            if spec.bits != top:
                raise ValueError(f"{_at(layer)}the grid's width {spec.bits} must be the largest row width {top}")
            if spec != GridSpec.default(top, self.symmetric):
                raise ValueError(f"{_at(layer)}per-row widths hold each row on the default grid of its width; the "
                                 f"layer's grid is {spec.kind}, not {GridSpec.default(top, self.symmetric).kind}")
        if granularity is not None and (granularity.kind != "channel" or granularity.axis % len(self.shape) != 0):
            raise ValueError(f"{_at(layer)}per-row widths need per-output-channel scales (granularity 'channel', "
                             f"axis 0), not {granularity.label()}")
        super().validate(data, spec=spec, granularity=granularity, weight_shape=weight_shape, layer=layer)

    def _params(self) -> dict:
        return {"widths": self.widths, "shape": self.shape, "symmetric": self.symmetric}

    def __repr__(self) -> str:
        counts = {b: self.widths.count(b) for b in sorted(set(self.widths))}
        return f"RowsLayout(rows per width={counts}, shape={self.shape}, symmetric={self.symmetric})"


FRAME_KEYS = ("kind", "dim", "size", "seed", "order", "along")  # the record's "frame" object, in this order
FRAME_ALONG = ("input", "output", "bias")  # what a quantized vector is: a row, a column, the bias


class FrameLayout(BitsLayout):
    """ΣΔ codes of frame coefficients, (N, M), bit packed at ``bits`` — and what rebuilds the frame.

    ``frame_kind`` ("harmonic"/"random"), ``dim`` (d, length of each quantized vector),
    ``size`` (N ≥ d frame vectors, codes per vector), ``seed`` (of a random frame), ``order``
    (ΣΔ order) and ``along`` ("input": the rows of the weight's (out, d) view are the vectors,
    "output": its columns, "bias": a 1-D bias is one vector); the codes are (N, M) with M
    vectors.  Codes are not weights: the weight is rebuilt by frame synthesis
    (``core.qweight.FrameQuantizedWeight``).
    """

    name = "frame"
    weight_kind = "frame"
    packing = "bits"  # frame coefficients are bit packed (as written since format version 1)
    codes_are_weights = False
    cheap_row_slices = False

    def __init__(self, bits: int, shape, *, frame_kind: str, dim: int, size: int, seed: int, order: int,
                 along: str) -> None:
        super().__init__(bits, shape)
        self.frame_kind, self.dim, self.size, self.seed, self.order, self.along = (
            frame_kind, dim, size, seed, order, along)
        params = self.frame_params()
        ok = (isinstance(frame_kind, str) and frame_kind in FRAME_KINDS and isinstance(along, str)
              and along in FRAME_ALONG and _is_int(order, 1, 2) and order in SD_ORDERS
              and _is_int(seed, 0, 2**63 - 1) and _is_int(dim, 1, 2**31) and _is_int(size, 1, 2**31))
        if not ok:
            raise ValueError(f"invalid frame parameters {str(params)[:160]}")
        if size < dim:
            raise ValueError(f"a frame needs at least as many vectors as their dimension, got size {size} < dim {dim}")
        if len(self.shape) != 2 or self.shape[0] != size:
            raise ValueError(f"frame codes must have shape (size, vectors) = ({size}, M), got {self.shape}")

    def frame_params(self) -> dict:
        """The record's "frame" object: kind, dim, size, seed, order, along (in that order)."""
        return {"kind": self.frame_kind, "dim": self.dim, "size": self.size, "seed": self.seed,
                "order": self.order, "along": self.along}

    @property
    def identity_bytes(self) -> bool:
        return False  # codes are coefficients: never read as the weight's int8 values

    def for_shape(self, shape) -> Layout:
        if tuple(shape) != self.shape:
            raise ValueError(f"frame codes have shape {self.shape}; they cannot be reshaped to {tuple(shape)}")
        return self

    def to_record(self) -> dict:
        return {**super().to_record(), "frame": self.frame_params(), "codes_shape": list(self.shape)}

    @classmethod
    def _from_record(cls, record, tensors, spec, weight_shape, layer) -> Layout:
        frame = record.get("frame")
        if not (isinstance(frame, dict) and set(frame) == set(FRAME_KEYS)):
            raise ValueError(f"{_at(layer)}lacks its frame parameters ({', '.join(FRAME_KEYS)})")
        cs = record.get("codes_shape")
        if not (isinstance(cs, list) and len(cs) == 2 and all(_is_int(s, 1, 2**40) for s in cs)):
            raise ValueError(f"{_at(layer)}lacks its codes shape (two positive integers)")
        try:
            return cls(spec.bits, tuple(cs), frame_kind=frame["kind"], dim=frame["dim"], size=frame["size"],
                       seed=frame["seed"], order=frame["order"], along=frame["along"])
        except ValueError as e:
            raise ValueError(f"{_at(layer)}{e}") from None

    def validate(self, data=None, *, spec=None, granularity=None, weight_shape=None, layer="") -> None:
        if weight_shape is not None:
            ws = tuple(weight_shape)
            numel = math.prod(ws)
            rows = ws[0] if ws else 0
            expect = {"input": numel // rows if rows else 0, "output": rows, "bias": numel}[self.along]
            fits = ((self.along == "bias") == (len(ws) == 1) and self.dim == expect and numel % self.dim == 0
                    and self.shape == (self.size, numel // self.dim))
            if not fits:
                raise ValueError(f"{_at(layer)}frame parameters {self.frame_params()} with codes of shape {self.shape} "
                                 f"do not fit a weight of shape {ws}")
        super().validate(data, spec=spec, granularity=granularity, weight_shape=weight_shape, layer=layer)

    def _params(self) -> dict:
        return {"bits": self.bits, "shape": self.shape, **self.frame_params()}


# ---- the record → class table -------------------------------------------------------------------

_LAYOUTS: dict[tuple[str, str], type[Layout]] = {}  # (record "kind", record "packing") → class
RESERVED_TENSOR_NAMES = ("codes", "scale", "zero_point", "bias")  # a saved layer's own tensors


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Make ``cls`` readable from records with its (``weight_kind``, ``packing``); returns ``cls``
    (usable as a class decorator).  A pair taken by another class is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Layout) and cls.packing and cls.name):
        raise ValueError(f"register_layout needs a Layout subclass with a name and a packing, got {cls!r}")
    taken = set(cls.tensor_names) & set(RESERVED_TENSOR_NAMES)
    if taken or not all(n.isidentifier() for n in cls.tensor_names):
        raise ValueError(f"{cls.__name__}: tensor names must be identifiers other than a layer's own "
                         f"({', '.join(RESERVED_TENSOR_NAMES)}), got {cls.tensor_names}")
    key = (cls.weight_kind, cls.packing)
    old = _LAYOUTS.get(key)
    if old is not None and old is not cls:
        raise ValueError(f"records of kind {key[0]!r} and packing {key[1]!r} are already read by {old.__name__}")
    _LAYOUTS[key] = cls
    return cls


def unregister_layout(cls: type[Layout]) -> None:
    """Undo :func:`register_layout` (tests)."""
    if _LAYOUTS.get((cls.weight_kind, cls.packing)) is cls:
        del _LAYOUTS[(cls.weight_kind, cls.packing)]


for _cls in (BitsLayout, TritsLayout, RowsLayout, FrameLayout, FP8Layout):
    register_layout(_cls)


def layout_class(record: dict, layer: str = "") -> type[Layout]:
    """The class a record's "kind" and "packing" name ("packing" absent: "bits", as in files
    written before it existed); a one-line ValueError for an unknown pair."""
    kind = record.get("kind")
    kinds = sorted({k for k, _ in _LAYOUTS})
    if not (isinstance(kind, str) and kind in kinds):
        raise ValueError(f"{_at(layer)}unknown weight kind {repr(kind)[:40]} (known: {', '.join(kinds)})")
    packing = record.get("packing", "bits")
    if not (isinstance(packing, str) and (kind, packing) in _LAYOUTS):
        known = sorted(p for k, p in _LAYOUTS if k == kind)
        raise ValueError(f"{_at(layer)}unknown code packing {repr(packing)[:40]} for {kind} weights "
                         f"(known: {', '.join(known)})")
    return _LAYOUTS[(kind, packing)]


def registered_layouts() -> tuple[type[Layout], ...]:
    """The registered layout classes."""
    return tuple(_LAYOUTS.values())


def layout_tensor_names() -> tuple[str, ...]:
    """Names of every extra tensor a registered layout may store (``row_bits``, ...)."""
    return tuple(sorted({n for cls in _LAYOUTS.values() for n in cls.tensor_names}))
