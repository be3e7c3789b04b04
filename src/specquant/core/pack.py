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
