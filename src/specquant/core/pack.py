"""Bit packing: 1..8-bit unsigned codes <-> a flat uint8 byte tensor, exact for any length.

Layout (little-endian bit order, codes contiguous across byte boundaries):
code ``i`` occupies bits ``i*bits … i*bits + bits - 1`` of one long bit stream, least
significant bit first, and stream bit ``p`` is bit ``p % 8`` of byte ``p // 8``.  For 1, 2 and
4 bits this puts code 0 in the low bits of byte 0 (e.g. at 4 bits, byte 0 = c0 | c1 << 4); for
3, 5, 6 and 7 bits codes straddle byte boundaries.  The last byte is padded with zero bits, so
``numel`` codes take exactly ``ceil(numel * bits / 8)`` bytes.

Packing is vectorized: the only Python loops run over at most 8 bit positions.  Ternary
digits are packed five per byte by :func:`pack_trits`.  How a weight's codes are laid out in
these bytes (which packer, in which order, with what else) is defined by ``core.layouts``.
"""
from __future__ import annotations

import torch

from specquant.core.grid import check_bits


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

    Computed byte-wise: eight codes of ``bits`` bits fill exactly ``bits`` bytes, so the stream
    is viewed as (groups, bits) bytes and code j of each group is cut from at most two of them
    (5-8x faster than expanding the bit stream at 3, 5, 6 and 7 bits).
    """
    check_bits(bits)
    _check_uint8(data, "data")
    nbytes = packed_nbytes(numel, bits)
    flat = data.reshape(-1)
    if flat.numel() < nbytes:
        raise ValueError(
            f"data holds {flat.numel()} byte(s) but {numel} codes of {bits} bits need {nbytes}"
        )
    if bits == 8:
        return flat[:nbytes].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        d = flat[:nbytes]
        parts = [(d >> (j * bits)) & mask for j in range(per)]  # per × (nbytes,)
        return torch.stack(parts, dim=1).reshape(-1)[:numel]
    ng = (numel + 7) // 8
    need = ng * bits
    d = flat[:need]  # bytes past nbytes only feed codes past numel, which are dropped
    if d.numel() < need:  # the last group is short: pad it with zero bytes
        d = torch.cat([d, d.new_zeros(need - d.numel())])
    b = d.reshape(ng, bits)  # (groups, bits) bytes
    out = torch.empty(ng, 8, dtype=torch.uint8, device=flat.device)  # (groups, 8) codes
    for j in range(8):
        k, o = divmod(j * bits, 8)  # code j starts at bit o of byte k
        c = b[:, k] >> o if o else b[:, k]
        if o + bits > 8:
            c = c | (b[:, k + 1] << (8 - o))  # uint8 shift drops the bits above the byte
        out[:, j] = c & mask if o + bits != 8 else c
    return out.reshape(-1)[:numel]


# ---- ternary codes, five per byte ------------------------------------------------------------
#
# A 3-level grid carries log2(3) = 1.585 bits per code; bit packing stores it in 2.  Trit packing
# stores five base-3 digits per byte (3^5 = 243 <= 256), 1.6 bits per digit: byte k holds digits
# 5k … 5k+4 as Σ_j d_{5k+j}·3^j, the last byte padded with zero digits.  Which codes become
# which digits is the layout's business (``core.layouts.TritsLayout``).

TRITS_PER_BYTE = 5


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
