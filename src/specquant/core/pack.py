"""Bit packing: 1..8-bit unsigned codes <-> a flat uint8 byte tensor, exact for any length.

Layout (little-endian bit order, codes contiguous across byte boundaries):
code ``i`` occupies bits ``i*bits … i*bits + bits - 1`` of one long bit stream, least
significant bit first, and stream bit ``p`` is bit ``p % 8`` of byte ``p // 8``.  For 1, 2 and
4 bits this puts code 0 in the low bits of byte 0 (e.g. at 4 bits, byte 0 = c0 | c1 << 4); for
3, 5, 6 and 7 bits codes straddle byte boundaries.  The last byte is padded with zero bits, so
``numel`` codes take exactly ``ceil(numel * bits / 8)`` bytes.

Packing is vectorized: the only Python loops run over at most 8 bit positions.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from specquant.core.grid import GridSpec, check_bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes that ``numel`` codes of ``bits`` bits take: ceil(numel*bits/8)."""
    check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    return (numel * bits + 7) // 8


def _check_uint8(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of dtype uint8, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"{name} must have dtype torch.uint8, got {t.dtype}")
    return t


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, values < 2**bits) into a 1-D uint8 tensor of bytes.

    The shape is not stored: keep ``codes.numel()`` (and the shape) beside the bytes.
    """
    check_bits(bits)
    _check_uint8(codes, "codes")
    flat = codes.reshape(-1)  # (n,)
    n = flat.numel()
    if bits < 8 and n:
        too_big = flat >= (1 << bits)
        n_bad = int(too_big.sum())
        if n_bad:
            first = int(torch.nonzero(too_big)[0])
            raise ValueError(
                f"{n_bad} code(s) do not fit in {bits} bits (max {(1 << bits) - 1}); "
                f"first at flat index {first} with value {int(flat[first])}"
            )
    if bits == 8:
        return flat.clone()
    nbytes = packed_nbytes(n, bits)
    if 8 % bits == 0:
        # 1, 2, 4 bits: a whole number of codes per byte, no straddling.
        per = 8 // bits
        padded = torch.zeros(nbytes * per, dtype=torch.uint8, device=flat.device)
        padded[:n] = flat
        grouped = padded.reshape(nbytes, per)  # (nbytes, per)
        out = torch.zeros(nbytes, dtype=torch.uint8, device=flat.device)
        for j in range(per):
            out |= grouped[:, j] << (j * bits)
        return out
    # 3, 5, 6, 7 bits: expand to a bit stream, then gather 8 stream bits per byte.
    stream = torch.zeros(nbytes * 8, dtype=torch.uint8, device=flat.device)
    body = stream[: n * bits].view(n, bits)  # (n, bits) view into the stream
    for j in range(bits):
        body[:, j] = (flat >> j) & 1
    grouped = stream.reshape(nbytes, 8)  # (nbytes, 8)
    out = torch.zeros(nbytes, dtype=torch.uint8, device=flat.device)
    for k in range(8):
        out |= grouped[:, k] << k
    return out


def unpack(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes of ``data`` as a 1-D uint8 tensor.

    ``data`` must hold at least ``packed_nbytes(numel, bits)`` bytes; bytes beyond that are
    ignored.  Reshape the result to the original shape yourself.
    """
    check_bits(bits)
    _check_uint8(data, "data")
    nbytes = packed_nbytes(numel, bits)
    flat = data.reshape(-1)
    if flat.numel() < nbytes:
        raise ValueError(
            f"data holds {flat.numel()} byte(s) but {numel} codes of {bits} bits need {nbytes}"
        )
    flat = flat[:nbytes]
    if bits == 8:
        return flat.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        grouped = torch.empty(nbytes, per, dtype=torch.uint8, device=flat.device)  # (nbytes, per)
        for j in range(per):
            grouped[:, j] = (flat >> (j * bits)) & mask
        return grouped.reshape(-1)[:numel].clone()
    stream = torch.empty(nbytes, 8, dtype=torch.uint8, device=flat.device)  # (nbytes, 8)
    for k in range(8):
        stream[:, k] = (flat >> k) & 1
    body = stream.reshape(-1)[: numel * bits].reshape(numel, bits)  # (numel, bits)
    out = torch.zeros(numel, dtype=torch.uint8, device=flat.device)
    for j in range(bits):
        out |= body[:, j] << j
    return out


# ---- grid-aware layouts: ternary codes 5 per byte, per-row widths ------------------------------
#
# A 3-level grid (the narrow symmetric 2-bit grid: codes 1, 2, 3) carries log2(3) = 1.585 bits
# per code; bit packing stores it in 2.  "trits" packing stores five codes per byte as a base-3
# number (3^5 = 243 <= 256), 1.6 bits per code: byte k holds codes 5k … 5k+4 as
# Σ_j (u_{5k+j} − 1)·3^j, the last byte padded with zero digits.  Every other grid is bit packed.
#
# A weight with per-row widths ("rows" layout: row r of the (out, n) code matrix has width
# b_r) stores, for each distinct width in increasing order, the rows of that width (in row
# order) packed with that width's own layout, the segments concatenated.

PACKINGS = ("bits", "trits", "rows")
TRITS_PER_BYTE = 5


def packing_for(levels: int, bits: int) -> str:
    """The layout a grid's codes get: "trits" for 3-level grids in 2 bits, else "bits"."""
    return "trits" if levels == 3 and bits == 2 else "bits"


def code_bits_exact(levels: int, bits: int) -> Fraction:
    """Stored bits per code of a grid under :func:`packing_for`, exactly (8/5 for 3 levels, else bits)."""
    return Fraction(8, TRITS_PER_BYTE) if packing_for(levels, bits) == "trits" else Fraction(bits)


def code_bits(levels: int, bits: int) -> float:
    """Stored bits per code of a grid under :func:`packing_for` (1.6 for 3 levels, else bits)."""
    return float(code_bits_exact(levels, bits))


def trits_nbytes(numel: int) -> int:
    """Bytes that ``numel`` ternary codes take at five per byte."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    return (numel + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(digits: torch.Tensor) -> torch.Tensor:
    """Pack uint8 base-3 ``digits`` (values 0, 1, 2; any shape) five per byte (1-D uint8)."""
    _check_uint8(digits, "digits")
    flat = digits.reshape(-1)  # (n,)
    n = flat.numel()
    bad = flat > 2
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise ValueError(f"{int(bad.sum())} ternary digit(s) exceed 2; first at flat index {first} "
                         f"with value {int(flat[first])}")
    nbytes = trits_nbytes(n)
    padded = torch.zeros(nbytes * TRITS_PER_BYTE, dtype=torch.int16, device=flat.device)
    padded[:n] = flat
    g = padded.reshape(nbytes, TRITS_PER_BYTE)  # (nbytes, 5)
    weights = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=flat.device)
    return (g * weights).sum(dim=1).to(torch.uint8)  # ≤ 242


def unpack_trits(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``numel`` digits (1-D uint8, values 0..2)."""
    _check_uint8(data, "data")
    nbytes = trits_nbytes(numel)
    flat = data.reshape(-1)
    if flat.numel() < nbytes:
        raise ValueError(f"data holds {flat.numel()} byte(s) but {numel} ternary codes need {nbytes}")
    flat = flat[:nbytes]
    if bool((flat > 242).any()):
        raise ValueError("a byte of ternary codes exceeds 242 (3^5 - 1): the data is not trit-packed")
    digits = torch.empty(nbytes, TRITS_PER_BYTE, dtype=torch.uint8, device=flat.device)  # (nbytes, 5)
    for j in range(TRITS_PER_BYTE):
        digits[:, j] = (flat // 3 ** j) % 3  # uint8 arithmetic: values ≤ 242
    return digits.reshape(-1)[:numel]  # (numel,)


def grid_nbytes(numel: int, levels: int, bits: int) -> int:
    """Bytes of ``numel`` codes of a grid under :func:`packing_for`."""
    if packing_for(levels, bits) == "trits":
        return trits_nbytes(numel)
    return packed_nbytes(numel, bits)


def pack_grid(codes: torch.Tensor, levels: int, bits: int, qmin: int) -> torch.Tensor:
    """Pack a grid's codes (values qmin … qmin+levels−1) with the grid's layout."""
    if packing_for(levels, bits) == "trits":
        _check_uint8(codes, "codes")
        if codes.numel() and bool((codes < qmin).any()):
            raise ValueError(f"a ternary code lies below the grid's smallest code {qmin}")
        return pack_trits(codes - qmin)
    return pack(codes, bits)


def unpack_grid(data: torch.Tensor, levels: int, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_grid` (1-D uint8 codes)."""
    if packing_for(levels, bits) == "trits":
        return unpack_trits(data, numel) + qmin
    return unpack(data, bits, numel)


def _row_widths(row_bits) -> list[int]:
    widths = [int(b) for b in (row_bits.tolist() if isinstance(row_bits, torch.Tensor) else row_bits)]
    for b in widths:
        check_bits(b, "row width")
    return widths


def rows_nbytes(row_bits, row_len: int, grid_of) -> int:
    """Bytes of the "rows" layout: ``grid_of(b)`` gives (levels, qmin) of width b's grid."""
    widths = _row_widths(row_bits)
    return sum(grid_nbytes(widths.count(b) * row_len, grid_of(b)[0], b) for b in sorted(set(widths)))


def pack_rows(codes: torch.Tensor, row_bits, grid_of) -> torch.Tensor:
    """Pack an (out, n) uint8 code matrix whose row r has width ``row_bits[r]`` ("rows" layout)."""
    _check_uint8(codes, "codes")
    widths = _row_widths(row_bits)
    c2 = codes.reshape(len(widths), -1)  # (out, n)
    bt = torch.tensor(widths)
    parts = []
    for b in sorted(set(widths)):
        levels, qmin = grid_of(b)
        parts.append(pack_grid(c2[bt == b].contiguous(), levels, b, qmin))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_rows(data: torch.Tensor, row_bits, row_len: int, grid_of) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: the (out, row_len) uint8 code matrix."""
    _check_uint8(data, "data")
    widths = _row_widths(row_bits)
    flat = data.reshape(-1)
    need = rows_nbytes(widths, row_len, grid_of)
    if flat.numel() < need:
        raise ValueError(f"data holds {flat.numel()} byte(s) but the rows need {need}")
    out = torch.empty(len(widths), row_len, dtype=torch.uint8, device=flat.device)  # (out, n)
    bt = torch.tensor(widths)
    pos = 0
    for b in sorted(set(widths)):
        sel = bt == b
        n_rows = int(sel.sum())
        levels, qmin = grid_of(b)
        nb = grid_nbytes(n_rows * row_len, levels, b)
        out[sel] = unpack_grid(flat[pos:pos + nb], levels, b, qmin, n_rows * row_len).reshape(n_rows, row_len)
        pos += nb
    return out


# ---- one entry point per layout ("bits", "trits", "rows"), rows on the default grids ----------


def _default_grids(symmetric: bool):
    """``grid_of`` for the "rows" layout: (levels, qmin) of the default grid of each width."""
    def grid_of(b: int) -> tuple[int, int]:
        g = GridSpec.default(int(b), symmetric)
        return g.levels, g.qmin
    return grid_of


def layout_nbytes(packing: str, spec: GridSpec, shape: tuple[int, ...], row_bits=None) -> int:
    """Bytes of a (``shape``) code tensor on grid ``spec`` in layout ``packing``.

    "rows": row r (first axis) has width ``row_bits[r]`` on the default grid of that width
    (symmetric like ``spec``); "trits" and "bits" as :func:`pack_grid` and :func:`pack`.
    """
    numel = math.prod(shape)
    if packing == "rows":
        return rows_nbytes(row_bits, numel // shape[0] if shape[0] else 0, _default_grids(spec.symmetric))
    if packing == "trits":
        return trits_nbytes(numel)
    return packed_nbytes(numel, spec.bits)


def pack_layout(codes: torch.Tensor, packing: str, spec: GridSpec, row_bits=None) -> torch.Tensor:
    """Pack uint8 ``codes`` in layout ``packing`` (see :func:`layout_nbytes`)."""
    if packing == "rows":
        return pack_rows(codes.reshape(codes.shape[0], -1), row_bits, _default_grids(spec.symmetric))
    if packing == "trits":
        return pack_grid(codes, spec.levels, spec.bits, spec.qmin)
    return pack(codes, spec.bits)


def unpack_layout(data: torch.Tensor, packing: str, spec: GridSpec, shape: tuple[int, ...],
                  row_bits=None) -> torch.Tensor:
    """Inverse of :func:`pack_layout`: uint8 codes of ``shape``."""
    numel = math.prod(shape)
    if packing == "rows":
        flat = unpack_rows(data, row_bits, numel // shape[0] if shape[0] else 0, _default_grids(spec.symmetric))
    elif packing == "trits":
        flat = unpack_grid(data, spec.levels, spec.bits, spec.qmin, numel)
    else:
        flat = unpack(data, spec.bits, numel)
    return flat.reshape(shape)
