"""Integer matmul with zero-point expansion (int32 accumulation).

With A ≈ S_A·(q_A − Z_A) (per tensor or per row of A) and B ≈ S_B·(q_B − Z_B) (per tensor or
per column of B, i.e. per output channel of a weight stored as B = Wᵀ),

    A B ≈ S_A S_B [q_A q_B − Z_A·colsum(q_B) − rowsum(q_A)·Z_B + K·Z_A·Z_B]

where only ``q_A q_B`` is a matmul; it runs on integers with int32 accumulation.  The codes are
uint8 (as stored by ``QuantizedWeight``); they are shifted to int8 (q − 128, with the zero
point shifted alike, which leaves q − Z unchanged) so that ``torch._int_mm`` can take them.

Backends of the integer product, tried in this order:
  ``"int_mm"``  torch._int_mm(int8, int8) -> int32 (CPU; CUDA when the shapes allow)
  ``"int32"``   torch.matmul on int32 tensors (CPU)
  ``"float64"`` exact float64 matmul of the integers (|sum| < 2^53), for devices without either
K is split into chunks of at most 2^17 − 1 so that no int32 partial sum can overflow
(|q| ≤ 128 after the shift, so each chunk's sum is below 2^31); chunks add up in int64.

The bracket is then evaluated in float64, exactly when the zero points are integers or
half-integers (every grid of ``specquant.core.grid``), and multiplied by the scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from specquant.core.grid import GridSpec, check_bits, check_finite, quantize_codes
from specquant.core.qweight import QuantizedWeight

_MAX_K_CHUNK = (1 << 17) - 1  # 128·128·(2^17 − 1) < 2^31: an int32 partial sum cannot overflow


@dataclass(frozen=True)
class IntProduct:
    """The integer product of two code matrices and how it was computed."""

    value: torch.Tensor  # (M, N) int32 (int64 when K was split into several chunks)
    backend: str  # "int_mm" | "int32" | "float64"


class QuantizedActivations(NamedTuple):
    """Dynamically quantized activations: x ≈ scale · (q − zero_point)."""

    q: torch.Tensor  # (..., K) uint8 codes
    scale: torch.Tensor  # (..., 1) float32 (or (1,)*dim for granularity="tensor")
    zero_point: torch.Tensor  # same shape as scale, integer-valued float32


def _to_signed(q: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """int8 codes and the offset subtracted from them (128 for uint8 input, 0 for int8)."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of dtype uint8 or int8, got {type(q).__name__}")
    if q.dtype == torch.uint8:
        return (q.to(torch.int16) - 128).to(torch.int8), 128
    if q.dtype == torch.int8:
        return q, 0
    raise ValueError(f"{name} must have dtype uint8 or int8 (integer codes), got {q.dtype}")


def _product_chunk(a: torch.Tensor, b: torch.Tensor) -> IntProduct:
    # a: (M, k) int8, b: (k, N) int8, k ≤ _MAX_K_CHUNK
    if hasattr(torch, "_int_mm"):
        try:
            return IntProduct(torch._int_mm(a.contiguous(), b.contiguous()), "int_mm")  # (M, N) int32
        except (RuntimeError, NotImplementedError):
            pass  # shape or device constraints (e.g. CUDA wants M > 16, k and N multiples of 8)
    try:
        return IntProduct(torch.matmul(a.to(torch.int32), b.to(torch.int32)), "int32")
    except (RuntimeError, NotImplementedError):
        pass  # integer matmul not implemented on this device
    exact = torch.matmul(a.to(torch.float64), b.to(torch.float64))  # exact: |sum| ≤ 2^31 < 2^53
    return IntProduct(exact.round().to(torch.int32), "float64")


def integer_product(qa: torch.Tensor, qb: torch.Tensor) -> IntProduct:
    """Exact integer product of int8 code matrices qa (M, K) and qb (K, N), int32 accumulation."""
    if qa.dtype != torch.int8 or qb.dtype != torch.int8:
        raise ValueError(f"integer_product takes int8 matrices, got {qa.dtype} and {qb.dtype}")
    if qa.dim() != 2 or qb.dim() != 2 or qa.shape[1] != qb.shape[0]:
        raise ValueError(f"shapes do not multiply: {tuple(qa.shape)} @ {tuple(qb.shape)}")
    K = qa.shape[1]
    if K <= _MAX_K_CHUNK:
        return _product_chunk(qa, qb)
    total = None
    backend = ""
    for k0 in range(0, K, _MAX_K_CHUNK):
        part = _product_chunk(qa[:, k0 : k0 + _MAX_K_CHUNK], qb[k0 : k0 + _MAX_K_CHUNK])
        backend = part.backend
        total = part.value.to(torch.int64) if total is None else total + part.value.to(torch.int64)
    return IntProduct(total, backend)


def _as_column(v: torch.Tensor | float, n: int, name: str, what: str, device: torch.device) -> torch.Tensor:
    """A per-tensor (1 value) or per-row/column (n values) parameter as a float64 (n or 1,) vector."""
    t = torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1)
    if t.numel() not in (1, n):
        raise ValueError(f"{name} must have 1 value (per tensor) or {n} (one per {what}), got {t.numel()}")
    return t


def int_matmul(
    qa: torch.Tensor,
    sa: torch.Tensor | float,
    za: torch.Tensor | float,
    qb: torch.Tensor,
    sb: torch.Tensor | float,
    zb: torch.Tensor | float,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(S_A(q_A − Z_A)) @ (S_B(q_B − Z_B)) from integer codes, via zero-point expansion.

    Args:
        qa: (..., K) uint8 (or int8) codes of A; leading dims are rows.
        sa, za: scale and zero point of A: one value, or one per row (any shape with M values,
            e.g. (..., 1) as returned by :func:`quantize_activations_dynamic`).
        qb: (K, N) uint8 (or int8) codes of B.  For a weight W (N, K) pass ``codes.T``.
        sb, zb: scale and zero point of B: one value, or one per column (N values).
        out_dtype: dtype of the result.
    Returns:
        (..., N) tensor equal to the dequantized float product up to float rounding.
    """
    ia, qa_off = _to_signed(qa, "qa")  # (..., K) int8
    ib, qb_off = _to_signed(qb, "qb")  # (K, N) int8
    if qb.dim() != 2:
        raise ValueError(f"qb must be a (K, N) matrix, got shape {tuple(qb.shape)}")
    if qa.dim() < 1 or qa.shape[-1] != qb.shape[0]:
        raise ValueError(f"shapes do not multiply: qa {tuple(qa.shape)} @ qb {tuple(qb.shape)}")
    lead = tuple(qa.shape[:-1])
    K, N = qb.shape
    a = ia.reshape(-1, K)  # (M, K) int8
    M = a.shape[0]
    dev = qa.device
    s_a = _as_column(sa, M, "sa", "row of A", dev).reshape(-1, 1)  # (M, 1) or (1, 1)
    z_a = _as_column(za, M, "za", "row of A", dev).reshape(-1, 1) - qa_off  # (M, 1) shifted zero point
    s_b = _as_column(sb, N, "sb", "column of B", dev).reshape(1, -1)  # (1, N) or (1, 1)
    z_b = _as_column(zb, N, "zb", "column of B", dev).reshape(1, -1) - qb_off  # (1, N)

    prod = integer_product(a, ib).value.to(torch.float64)  # (M, N) exact integers
    rowsum_a = a.to(torch.int64).sum(dim=1, keepdim=True).to(torch.float64)  # (M, 1)
    colsum_b = ib.to(torch.int64).sum(dim=0, keepdim=True).to(torch.float64)  # (1, N)
    bracket = prod - z_a * colsum_b - rowsum_a * z_b + K * (z_a * z_b)  # (M, N), exact
    out = (s_a * s_b) * bracket  # (M, N)
    return out.to(out_dtype).reshape(*lead, N)


def quantize_activations_dynamic(
    x: torch.Tensor, bits: int = 8, symmetric: bool = False, granularity: str = "row"
) -> QuantizedActivations:
    """Dynamic (run-time, min-max) quantization of activations x (..., K).

    ``granularity="row"`` gives each row (every index of the leading dims) its own scale and
    zero point; ``"tensor"`` one for all.  Asymmetric: codes 0..2^b−1 with an integer zero
    point, the range always containing 0.  Symmetric: the narrow grid of
    ``specquant.core.grid`` (codes 1..2^b−1, zero point 2^(b−1)); binary at 1 bit.
    """
    check_bits(bits)
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise ValueError("x must be a floating-point tensor")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor with a last (K) dimension, got {tuple(x.shape)}")
    if granularity not in ("row", "tensor"):
        raise ValueError(f"unknown granularity {granularity!r}; allowed: 'row', 'tensor'")
    check_finite(x, "activations")
    spec = GridSpec.default(bits, symmetric)
    xf = x.detach().float()
    if granularity == "row":
        lo = xf.amin(dim=-1, keepdim=True)  # (..., 1)
        hi = xf.amax(dim=-1, keepdim=True)  # (..., 1)
    else:
        lo = xf.amin().reshape((1,) * x.dim())
        hi = xf.amax().reshape((1,) * x.dim())
    if spec.kind == "binary":
        if granularity == "row":
            alpha = xf.abs().mean(dim=-1, keepdim=True)  # (..., 1)
        else:
            alpha = xf.abs().mean().reshape(lo.shape)
        scale, zp = spec.qparams_from_alpha(alpha)
    else:
        scale, zp = spec.qparams_from_range(lo, hi)
    codes = quantize_codes(xf, scale, zp, spec)  # (..., K) float integers
    return QuantizedActivations(codes.to(torch.uint8), scale, zp)


def int_linear(
    x: torch.Tensor, qw: QuantizedWeight, act_bits: int = 8, act_symmetric: bool = False
) -> torch.Tensor:
    """y = x Wᵀ with x quantized dynamically per row and W given by its codes (integer matmul).

    ``qw`` must be quantized per tensor or per output channel (axis 0); conv weights are
    viewed as (out, in·kh·kw), so ``x`` must then be the unfolded input.  Group granularity
    needs one integer product per group and is not handled here.
    """
    g = qw.granularity
    if g.kind == "group" or (g.kind == "channel" and g.axis % len(qw.shape) != 0):
        raise ValueError(
            f"int_linear needs per-tensor or per-output-channel (axis 0) weight scales, got {g.label()}"
            f"{'' if g.kind != 'channel' else f' on axis {g.axis}'}"
        )
    n_out = qw.shape[0]
    qb = qw.codes.reshape(n_out, -1).T  # (K, N)
    xa = quantize_activations_dynamic(x, act_bits, act_symmetric)
    return int_matmul(xa.q, xa.scale, xa.zero_point, qb, qw.scale, qw.zero_point, out_dtype=x.dtype)
