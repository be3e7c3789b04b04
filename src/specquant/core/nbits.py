"""onnxruntime's ``com.microsoft.MatMulNBits`` weight form, built exactly from specquant's codes.

MatMulNBits computes ``Y = A @ Wᵀ`` for a 2-D weight W (N outputs, K inputs) stored block-wise
along K.  Its tensors (onnxruntime's ContribOperators.md):

================  ===============================================================================
``B``             uint8 (N, n_blocks, blob): row n's codes, K of them padded to n_blocks·block_size,
                  bit packed low bits first (4 bits: byte = c0 | c1 << 4), blob = block_size·bits/8
``scales``        float (N·n_blocks,): one scale per block, row-major
``zero_points``   optional: uint8 (N·ceil(n_blocks·bits/8),), the per-block zero points bit packed
                  like B, each row padded to a whole byte; or float (N·n_blocks,); absent: 2^(bits−1)
attributes        K, N, bits, block_size (a power of two >= 16), accuracy_level
================  ===============================================================================

and ``W[n, k] = (code − zero_point) · scale`` of k's block, which is specquant's own formula.  So
a uniform quantized weight fits exactly — same codes, same scales, nothing re-rounded — when:

* its codes are 2, 4 or 8 bits wide (onnxruntime 1.32 refuses 3, 5, 6, 7 and 1);
* every block lies inside one of specquant's groups: groups of G (< K) inputs take blocks of the
  largest power of two b >= 16 that divides G (b = G when G is a power of two; 2-bit blocks stop at
  256, onnxruntime's limit), each group's scale and zero point repeated over its G/b blocks; a
  per-channel or per-tensor scale (or a group as long as the row) is one group per row, cut into
  blocks of ``ROW_BLOCK`` (or the power of two >= K when K is smaller).  A shorter last group of
  specquant (K mod G inputs) starts on a block boundary, and a row whose length is not a multiple
  of b ends in a partial block that onnxruntime pads (the padding codes here: the zero point);
* its zero points are the grid's fixed 2^(bits−1) ("narrow" and "full" grids: no zero-point
  input), integers in 0..2^bits−1 ("asymmetric": packed uint8), or other values such as the
  half-integers of "midrise" grids (float zero points; onnxruntime takes them at 2 and 4 bits only).

Anything else — frame coefficients, rows of mixed widths, a group size that is not a multiple of
16, per-input-channel scales — is refused with one ValueError line naming the layer and the reason
(``nbits_weight``); ``nbits_reason`` returns that reason without raising.  ``NBitsWeight.decode``
reads the tensors back (codes, per-block scales and zero points), for exact round-trip checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specquant.core.grid import Granularity
from specquant.core.layouts import BitsLayout, TritsLayout
from specquant.core.pack import pack, unpack
from specquant.core.qweight import QuantizedWeight

NBITS_WIDTHS = (2, 4, 8)  # code widths onnxruntime's CPU MatMulNBits kernel accepts
MIN_BLOCK = 16  # smallest block size MatMulNBits accepts (blocks are powers of two)
MAX_BLOCK_2BIT = 256  # onnxruntime refuses larger 2-bit blocks
ROW_BLOCK = 256  # block size for per-channel / per-tensor scales (one group per row)
FLOAT_ZP_WIDTHS = (2, 4)  # widths at which onnxruntime's CPU kernel takes float zero points


@dataclass(frozen=True)
class NBitsWeight:
    """The tensors and attributes of one MatMulNBits node (see the module docstring)."""

    B: torch.Tensor  # uint8 (N, n_blocks, blob): codes bit packed per block
    scales: torch.Tensor  # float32 (N·n_blocks,): one scale per block
    zero_points: torch.Tensor | None  # uint8 packed (N·ceil(n_blocks·bits/8),), float32 (N·n_blocks,) or None
    K: int  # inputs (columns of the weight)
    N: int  # outputs (rows of the weight)
    bits: int  # code width: 2, 4 or 8
    block_size: int  # inputs per block, a power of two >= 16
    zero_point_kind: str  # "default" (2^(bits−1), no input), "uint8" (packed) or "float"
    blocks_per_group: int  # blocks that repeat one of specquant's scales (1: the quantizer's own groups)

    @property
    def n_blocks(self) -> int:
        """Blocks per row, ceil(K / block_size)."""
        return -(-self.K // self.block_size)

    def nbytes(self) -> int:
        """Bytes of the three tensors (what a file holding this node must store for it)."""
        zp = 0 if self.zero_points is None else self.zero_points.numel() * self.zero_points.element_size()
        return self.B.numel() + self.scales.numel() * 4 + zp

    def attributes(self) -> dict[str, int]:
        """The node's integer attributes (K, N, bits, block_size)."""
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size}

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (N, K) uint8, scales (N, n_blocks) float32, zero points (N, n_blocks) float32) read back
        from the packed tensors."""
        N, nb, bs = self.N, self.n_blocks, self.block_size
        codes = unpack(self.B.reshape(-1), self.bits, N * nb * bs).reshape(N, nb * bs)[:, :self.K]  # (N, K)
        scales = self.scales.reshape(N, nb).float()  # (N, n_blocks)
        if self.zero_point_kind == "default":
            zp = torch.full((N, nb), float(1 << (self.bits - 1)))
        elif self.zero_point_kind == "float":
            zp = self.zero_points.reshape(N, nb).float()
        else:
            per_row = -(-nb * self.bits // 8)  # bytes per row
            zp = unpack(self.zero_points.reshape(-1), self.bits, N * per_row * 8 // self.bits)
            zp = zp.reshape(N, -1)[:, :nb].float()  # (N, n_blocks)
        return codes, scales, zp

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) the node multiplies by: (code − zero point)·scale per block."""
        codes, scales, zp = self.decode()
        rep = lambda t: t.repeat_interleave(self.block_size, dim=1)[:, :self.K]  # noqa: E731  (N, K)
        return (codes.float() - rep(zp)) * rep(scales)


def _pow2_divisor(g: int, cap: int) -> int:
    """Largest power of two <= cap dividing g (1 if g is odd)."""
    return min(g & -g, cap)


def _block_plan(qw: QuantizedWeight, K: int) -> tuple[int, int]:
    """(block_size, blocks per group) for a weight with K inputs, or a ValueError with the reason."""
    g = qw.granularity
    cap = MAX_BLOCK_2BIT if qw.bits == 2 else 1 << 30
    if g.kind == "channel" and g.axis % 2 != 0:
        raise ValueError(f"per-input-channel scales (axis {g.axis}) do not follow MatMulNBits' blocks along K")
    if g.kind in ("tensor", "channel") or g.group_size >= K:  # one group per row
        b = max(MIN_BLOCK, min(ROW_BLOCK, 1 << max(0, (K - 1).bit_length()), cap))
        return b, -(-K // b)
    G = g.group_size
    b = _pow2_divisor(G, cap)
    if b < MIN_BLOCK:
        raise ValueError(f"group size {G} is not a multiple of {MIN_BLOCK}: MatMulNBits' blocks (powers of two "
                         f">= {MIN_BLOCK}) cannot follow its groups")
    return b, G // b


def _zero_point_kind(qw: QuantizedWeight) -> str:
    """"default", "uint8" or "float" for this weight's zero points, or a ValueError with the reason."""
    zp = qw.zero_point.float()
    if bool(torch.all(zp == float(1 << (qw.bits - 1)))):
        return "default"
    if bool(((zp >= 0) & (zp <= qw.spec.qmax) & (zp == zp.round())).all()):
        return "uint8"
    if not bool(torch.isfinite(zp).all()):
        raise ValueError("its zero points are not finite")
    if qw.bits not in FLOAT_ZP_WIDTHS:
        raise ValueError(f"its {qw.spec.kind} grid has non-integer zero points, which onnxruntime's MatMulNBits "
                         f"takes at {' and '.join(map(str, FLOAT_ZP_WIDTHS))} bits only, not {qw.bits}")
    return "float"


def _check(qw: QuantizedWeight) -> None:
    """Raise a ValueError (without the layer name) if ``qw`` has no exact MatMulNBits form."""
    if not isinstance(qw, QuantizedWeight) or not qw.layout.codes_are_weights:
        kind = getattr(getattr(qw, "layout", None), "weight_kind", type(qw).__name__)
        raise ValueError(f"its weight is {kind}-quantized (codes are not the weight's entries): MatMulNBits holds "
                         f"uniform codes only")
    if qw.spec.fp8 is not None:
        raise ValueError(f"its codes are {qw.spec.kind} floats; onnxruntime's MatMulNBits holds integer codes only")
    if not isinstance(qw.layout, (BitsLayout, TritsLayout)):
        raise ValueError(f"its codes use the {qw.layout.name} layout (rows of mixed widths); MatMulNBits has one "
                         f"width per node")
    if len(qw.shape) != 2:
        raise ValueError(f"MatMulNBits holds 2-D (out, in) weights, this one has shape {tuple(qw.shape)}")
    if qw.bits not in NBITS_WIDTHS:
        raise ValueError(f"its codes are {qw.bits}-bit; onnxruntime's MatMulNBits runs "
                         f"{', '.join(map(str, NBITS_WIDTHS))}-bit codes")


def nbits_reason(qw: QuantizedWeight) -> str | None:
    """None when ``qw`` has an exact MatMulNBits form, else why not (one line)."""
    try:
        _check(qw)
        _block_plan(qw, qw.shape[1])
        _zero_point_kind(qw)
    except ValueError as e:
        return str(e)
    return None


def _per_block(t: torch.Tensor, g: Granularity, shape: tuple[int, int], n_groups: int, reps: int,
               n_blocks: int) -> torch.Tensor:
    """A scale or zero point (scale shape) as one value per block (N, n_blocks): each group's value
    repeated over its ``reps`` blocks."""
    N = shape[0]
    if g.kind == "group" and n_groups > 1:
        per_group = t.float().reshape(N, n_groups)  # (N, groups)
    else:  # one value per row (channel), or one for the tensor
        per_group = t.float().reshape(-1, 1).expand(N, 1)  # (N, 1)
    return per_group.repeat_interleave(reps, dim=1)[:, :n_blocks].contiguous()  # (N, n_blocks)


def nbits_weight(qw: QuantizedWeight, layer: str = "") -> NBitsWeight:
    """The MatMulNBits tensors of a 2-D uniform quantized weight (N, K), exact: its codes and its
    scales (as stored: float16 scales are widened to float32, exactly), never re-rounded.

    Raises a one-line ValueError naming ``layer`` when the weight has no such form (see the module
    docstring)."""
    try:
        _check(qw)
        N, K = (int(s) for s in qw.shape)
        bs, reps = _block_plan(qw, K)
        zkind = _zero_point_kind(qw)
    except ValueError as e:
        raise ValueError(f"layer '{layer}': {e}" if layer else str(e)) from None
    g = qw.granularity
    nb = -(-K // bs)
    n_groups = g.num_groups((N, K)) if g.kind == "group" else 1
    scales = _per_block(qw.scale, g, (N, K), n_groups, reps, nb)  # (N, n_blocks)
    zp = _per_block(qw.zero_point, g, (N, K), n_groups, reps, nb)  # (N, n_blocks)
    codes = qw.codes.to(torch.uint8).reshape(N, K)
    pad = nb * bs - K
    if pad:  # the last block's padding: the block's zero point (0 for float zero points), never read
        fill = zp[:, -1:].round().clamp(0, qw.spec.qmax) if zkind != "float" else torch.zeros(N, 1)
        codes = torch.cat([codes, fill.to(torch.uint8).expand(N, pad)], dim=1)  # (N, n_blocks·bs)
    blob = bs * qw.bits // 8
    B = pack(codes.contiguous(), qw.bits).reshape(N, nb, blob)  # rows end on byte boundaries: bs·bits % 8 == 0
    zero_points = None
    if zkind == "uint8":
        per_row = -(-nb * qw.bits // 8)  # bytes per row
        zcodes = torch.zeros(N, per_row * 8 // qw.bits, dtype=torch.uint8)  # (N, padded blocks)
        zcodes[:, :nb] = zp.to(torch.uint8)
        zero_points = pack(zcodes, qw.bits)  # (N·per_row,)
    elif zkind == "float":
        zero_points = zp.reshape(-1).contiguous()  # (N·n_blocks,)
    return NBitsWeight(B=B, scales=scales.reshape(-1).contiguous(), zero_points=zero_points, K=K, N=N,
                       bits=qw.bits, block_size=bs, zero_point_kind=zkind, blocks_per_group=reps)
