"""Layers that run on packed low-bit weights: ``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``.

A layer holds what ``specquant.save`` writes, nothing more: its bias and one ``PackedWeight``
(``layer.packed``), the quantized weight as stored, over a ``core.layouts.Layout``:

=================  ==========================================================================
``PackedWeight``   contents
=================  ==========================================================================
``layout``         how the codes are stored (``BitsLayout``, ``TritsLayout``, ``RowsLayout``,
                   ``FrameLayout``, ...): shape of the codes, bytes, extra tensors
``codes``          buffer: the codes packed by the layout (uint8, 1-D, ``layout.nbytes()``
                   bytes).  When the layout stores one byte per code (8-bit codes): the same
                   bytes with the top bit flipped, i.e. the int8 values ``u − 128`` in the
                   weight's (out, in·k…) layout, which torch's int8 kernels take without a copy.
``scale``          buffer: one scale per block, ``granularity.scale_shape(layout.shape)``, in its
                   storage dtype: float32 by default, float16 when quantized with
                   ``scale_dtype="float16"`` (``QuantizedWeight.scale_dtype``) or loaded from a
                   file that stores float16 scales (upcast to float32 when used).
``zero_point``     buffer: same shape as ``scale`` (float32), or absent (``None``) for symmetric
                   grids whose zero point is fixed by the grid kind (``zero_point_value``).
``row_bits`` …     buffers: the layout's own tensors (``layout.tensors()``), under their names.
``spec`` …         the grid, granularity, weight shape and dtype, algorithm and info.
=================  ==========================================================================

Layers whose weights are tied share one ``PackedWeight``.  Uniform weights (codes are the
weight's entries, ``layout.codes_are_weights``) are dequantized as (codes − zp)·scale; frame
coefficients (``FrameLayout``, ``core.qweight.FrameQuantizedWeight``) by rebuilding the frame at
each call unless ``cache_dequantized`` (weight-only path only).

A layer may also quantize its input (``input_quant``, a ``core.actquant.ActQuantizer``: static,
per tensor, asymmetric; or a ``TokenActQuantizer``: each row's range at run time; set by
``convert`` from the module's ``.act_quant`` and by ``load`` from the file's "act" record): both
paths below then see ``input_quant.fake_quantize(x)``, the same float operations as the engine's
fake-quant model, so outputs stay bit-identical with it.

Two forward paths:

* ``mode="weight_only"`` (any bit width, the default).  ``QuantLinear`` first tries onnxruntime's
  MatMulNBits kernel on its packed codes (``nn.ort_kernel``; ``kernel="auto"``, the default: 4-bit
  weights with an exact MatMulNBits form, onnxruntime installed, a float32 CPU input, no autograd,
  no tracing); its outputs equal the PyTorch path's up to float rounding of the sums.  Otherwise,
  and for convolutions, the PyTorch path: unpack → dequantize → ``F.linear`` /
  ``F.conv*d``.  Nothing is cached, so the layer's memory stays the packed size; the float
  weight exists only during the call, and for Linear layers above ``CHUNK_WEIGHTS`` weights only
  in chunks of output rows (about 1 MiB of floats, which stay in cache: far faster than
  materialising a large weight, and the temporary memory stays small) when the layout cuts rows
  cheaply (``layout.cheap_row_slices``, or one byte per code).  ``cache_dequantized=True``
  keeps the float weight after the first call: then the layer runs at fp32 speed but holds the
  float copy as well (``memory_bytes`` counts it).  The weight is computed with the same float
  operations as ``QuantizedWeight.dequantize()`` (which gives the fake-quant model its
  ``module.weight``), so outputs equal the fake-quant model's; row chunks keep every output one
  dot product over all inputs, which the tests check to be bit-identical with this BLAS.
* ``mode="int8_dynamic"`` (8-bit weights stored one byte per code, per-tensor or per-output-channel
  scales; Linear and Conv2d with groups=1): activations are quantized at run time with
  ``core.intmatmul.quantize_activations_dynamic`` (Linear: per row, asymmetric 8-bit; Conv2d:
  per sample, symmetric 8-bit, before im2col, so that zero padding stays exactly zero and
  the quantization pass runs over the input, not the 9× larger patches), the integer product runs in
  ``torch._int_mm`` (int8 × int8 → int32) where present, else ``core.intmatmul.integer_product``,
  and the zero-point expansion of ``core.intmatmul.int_matmul`` is evaluated in float64 with
  the weight's column sums precomputed.  Its numerics differ from the fake-quant model by the
  activation rounding (that is the point of it); it equals ``core.intmatmul.int_linear``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from specquant.core.actquant import ActQuantizer, TokenActQuantizer
from specquant.core.grid import Granularity, GridSpec, dequantize_codes
from specquant.core.intmatmul import integer_product, quantize_activations_dynamic
from specquant.core.layouts import Layout
from specquant.core.qweight import QuantizedWeight, from_stored, zero_point_storage
from specquant.nn.ort_kernel import KERNELS, OrtLinearSlot, call_reason

MODES = ("weight_only", "int8_dynamic", "int8_static")
CHUNK_WEIGHTS = 1 << 18  # weight-only Linear layers above this size are dequantized in row chunks


def _to_module_shape(qw: QuantizedWeight, shape: tuple[int, ...]) -> QuantizedWeight:
    """The QuantizedWeight with codes and scales viewed in the module's weight shape."""
    if tuple(qw.shape) == tuple(shape):
        return qw
    if math.prod(qw.shape) != math.prod(shape):
        raise ValueError(f"quantized weight of shape {tuple(qw.shape)} does not fit a weight of shape "
                         f"{tuple(shape)}")
    g = qw.granularity
    if g.kind == "channel" and g.axis % len(qw.shape) != 0:
        raise ValueError(f"cannot reshape a weight quantized per channel on axis {g.axis} to {shape}")
    sshape = g.scale_shape(tuple(shape))
    return QuantizedWeight(
        codes=qw.codes.reshape(shape), scale=qw.scale.reshape(sshape),
        zero_point=qw.zero_point.reshape(sshape),
        spec=qw.spec, granularity=g, dtype=qw.dtype, algorithm=qw.algorithm, info=qw.info, layout=qw.layout,
        scale_dtype=qw.scale_dtype,
    )


def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact product of int8 matrices a (M, K) and b (K, N): ``torch._int_mm`` (int32 accumulation)
    where it runs, else ``core.intmatmul.integer_product``."""
    if hasattr(torch, "_int_mm") and a.shape[1] < (1 << 17):  # 128·128·K < 2^31: no int32 overflow
        try:
            return torch._int_mm(a, b)
        except (RuntimeError, NotImplementedError):
            pass  # shape or device constraints
    return integer_product(a, b).value


class PackedWeight(nn.Module):
    """A quantized weight as stored: packed code bytes, scales, zero points and their ``Layout``.

    Args:
        layout: how the codes are stored; checked against the grid, granularity, weight shape
            and ``codes`` (ValueError naming the problem).
        codes: the packed bytes, ``layout.pack(codes)`` (1-D uint8, ``layout.nbytes()``).
        scale: one scale per block, ``granularity.scale_shape(layout.shape)``.
        zero_point: same shape as ``scale``, or None when the symmetric grid fixes it.
        spec, granularity, weight_shape, dtype, algorithm, info: as ``QuantizedWeight``
        (``weight_shape``: the module's weight shape; ``dtype``: the original weight dtype).
    """

    def __init__(self, layout: Layout, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 *, spec: GridSpec, granularity: Granularity, weight_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32, algorithm: str = "rtn", info: dict | None = None) -> None:
        super().__init__()
        if not isinstance(layout, Layout):
            raise ValueError(f"layout must be a core.layouts.Layout, got {type(layout).__name__}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        layout.validate(codes, spec=spec, granularity=granularity, weight_shape=self.weight_shape)
        self.layout = layout
        self.spec = spec
        self.granularity = granularity
        self.dtype = dtype
        self.algorithm = algorithm
        self.info = dict(info or {})
        sshape = granularity.scale_shape(layout.shape)
        if tuple(scale.shape) != sshape:
            raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {sshape} for {granularity.label()}")
        if zero_point is not None and tuple(zero_point.shape) != sshape:
            raise ValueError(f"zero_point has shape {tuple(zero_point.shape)}, expected {sshape}")
        if zero_point is None and not spec.symmetric:
            raise ValueError("an asymmetric grid needs its zero points")
        if self.int8_codes:
            # u − 128 as int8 (flip the top bit): the layout of torch's int8 kernels, same bytes.
            stored = (codes ^ 0x80).view(torch.int8).reshape(layout.shape[0], -1)  # (out, in·k…)
        else:
            stored = codes
        self.register_buffer("codes", stored)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.detach().float().clone())
        for name, t in layout.tensors().items():
            self.register_buffer(name, t)
        self.zero_point_value = spec.symmetric_zero_point if zero_point is None else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, weight_shape: tuple[int, ...]) -> PackedWeight:
        """Pack ``qw`` for a module whose weight has ``weight_shape`` (uniform codes are viewed in
        that shape; frame codes must describe a weight with its number of rows and entries)."""
        if not isinstance(qw, QuantizedWeight):
            raise ValueError(f"specquant.nn has no packed layer for weights of type {type(qw).__name__}")
        shape = tuple(int(s) for s in weight_shape)
        if qw.layout.codes_are_weights:
            qw = _to_module_shape(qw, shape)
        elif math.prod(qw.shape) != math.prod(shape) or qw.shape[0] != shape[0]:
            # the engine hands algorithms the (out, in·kh·kw) view: any shape with the same rows fits
            raise ValueError(f"{qw.layout.name} weight of shape {tuple(qw.shape)} does not fit a weight of shape "
                             f"{shape}")
        zp = qw.zero_point
        implicit = zero_point_storage(qw.spec, zp) == "implicit"
        # the scales in their storage dtype (exact: QuantizedWeight checks that they fit it)
        return cls(qw.layout, qw.layout.pack(qw.codes.to(torch.uint8)), qw.scale.to(qw.scale_dtype),
                   None if implicit else zp.float(), spec=qw.spec, granularity=qw.granularity, weight_shape=shape,
                   dtype=qw.dtype, algorithm=qw.algorithm, info=qw.info)

    # ---- storage --------------------------------------------------------------------------

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def int8_codes(self) -> bool:
        """Whether ``codes`` holds int8 values u − 128 in (out, in·k…) (one byte per code)."""
        return self.layout.identity_bytes

    @property
    def row_chunks(self) -> bool:
        """Whether rows of the weight can be dequantized without unpacking the others."""
        return self.layout.codes_are_weights and (self.int8_codes or self.layout.cheap_row_slices)

    def packed_bytes(self) -> torch.Tensor:
        """The packed codes (1-D uint8, ``layout.pack(codes)``), as ``specquant.save`` writes them."""
        if self.int8_codes:
            return self.codes.reshape(-1).view(torch.uint8) ^ 0x80
        return self.codes

    def unpack(self) -> torch.Tensor:
        """uint8 codes in ``layout.shape`` (the weight's shape for uniform weights)."""
        if self.int8_codes:  # one byte per code: the bytes are the codes
            return self.packed_bytes().reshape(self.layout.shape)
        return self.layout.unpack(self.codes)

    def zero_point_tensor(self) -> torch.Tensor:
        """Zero points in the scale's shape (float32), also when the grid fixes them."""
        if self.zero_point is not None:
            return self.zero_point
        return torch.full(tuple(self.scale.shape), self.zero_point_value, dtype=torch.float32,
                          device=self.scale.device)

    def to_quantized_weight(self) -> QuantizedWeight:
        """The ``QuantizedWeight`` this was packed from (codes unpacked, scales as stored)."""
        return from_stored(self.layout, self.unpack(), self.scale.float(), self.zero_point_tensor(), spec=self.spec,
                           granularity=self.granularity, weight_shape=self.weight_shape, dtype=self.dtype,
                           algorithm=self.algorithm, info=self.info,
                           scale_dtype=torch.float16 if self.scale.dtype == torch.float16 else torch.float32)

    # ---- dequantization ---------------------------------------------------------------------

    def _zero_point_for(self, r0: int, r1: int):
        """Zero point matching the stored codes (shifted by 128 for int8 codes), rows r0:r1 if per row."""
        off = 128.0 if self.int8_codes else 0.0
        if self.zero_point is None:
            return self.zero_point_value - off
        zp = self.zero_point
        if zp.shape[0] == self.weight_shape[0] and zp.shape[0] > 1:
            zp = zp[r0:r1]
        # codes are u − 128 at 8 bits: (u − 128) − (zp − 128) == u − zp exactly (small integers)
        return zp - off if off else zp

    def dequantize(self) -> torch.Tensor:
        """The float weight (original shape and dtype): equal to ``to_quantized_weight().dequantize()``."""
        if not self.layout.codes_are_weights:
            return self.to_quantized_weight().dequantize().reshape(self.weight_shape).contiguous()
        return self.dequantize_rows(0, self.weight_shape[0])

    def dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the float weight, (r1 − r0, *weight_shape[1:]) in the original dtype, uniform
        weights only: the same float operations as ``QuantizedWeight.dequantize()`` on those rows."""
        rows, n = r1 - r0, self.weight_shape[0]
        g = self.granularity
        shape = (rows, *self.weight_shape[1:])
        c = self.codes[r0:r1] if self.int8_codes else self.layout.unpack_rows(self.codes, r0, r1)
        per_row = self.scale.shape[0] == n and n > 1
        s = (self.scale[r0:r1] if per_row else self.scale).float()
        # (codes − zp)·scale, the subtraction fused with the uint8/int8 → float32 conversion: the
        # same values as QuantizedWeight.dequantize() (the difference is exact), one pass fewer;
        # blocked_shape, a shorter last group padded and cut off again
        if self.spec.fp8 is not None:  # FP8 bit patterns: scale·fp8(code), as QuantizedWeight.dequantize()
            w = dequantize_codes(g.to_blocks(c.reshape(shape)), s, None, self.spec)
            return g.from_blocks(w, shape).to(self.dtype)
        w = (g.to_blocks(c.reshape(shape)) - self._zero_point_for(r0, r1)) * s
        return g.from_blocks(w, shape).to(self.dtype)

    def extra_repr(self) -> str:
        return (f"{self.layout!r}, grid={self.spec.kind}, granularity={self.granularity.label()}, "
                f"zero_point={'stored' if self.zero_point is not None else 'implicit'}")


class _QuantLayer(nn.Module):
    """Shared weight-only/int8 machinery of the packed layers, over ``self.packed``."""

    layer_type = "base"  # name of the float module type this layer replaces

    def _init_layer(self, weight_shape: tuple[int, ...], packed: PackedWeight, bias: torch.Tensor | None,
                    mode: str, cache_dequantized: bool) -> None:
        if not isinstance(packed, PackedWeight):
            raise ValueError(f"packed must be a PackedWeight, got {type(packed).__name__}")
        shape = tuple(int(s) for s in weight_shape)
        if packed.weight_shape != shape:
            raise ValueError(f"the packed weight has shape {packed.weight_shape}, this layer's weight {shape}")
        self.packed = packed
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cache_dequantized = bool(cache_dequantized)
        self.input_quant: ActQuantizer | TokenActQuantizer | None = None  # input quantizer (config.act_bits), first
        self.register_buffer("_wcache", None, persistent=False)
        self.register_buffer("_colsum", None, persistent=False)
        self.mode = "weight_only"
        self.set_mode(mode)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.packed.weight_shape

    def to_quantized_weight(self) -> QuantizedWeight:
        """The ``QuantizedWeight`` this layer was built from (codes unpacked, scales as stored)."""
        return self.packed.to_quantized_weight()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``layer.weight`` directly (e.g. the fast path of
        ``nn.TransformerEncoderLayer``, which passes its Linear weights to a fused kernel).  Read-only:
        computed from the packed codes on each access (kept with ``cache_dequantized``)."""
        return self.dequantized_weight()

    def set_input_quant(self, aq: ActQuantizer | TokenActQuantizer | None) -> None:
        """Quantize this layer's input with ``aq`` (None: float input) before every product."""
        if aq is not None and not isinstance(aq, (ActQuantizer, TokenActQuantizer)):
            raise ValueError(f"input_quant must be a core.actquant.ActQuantizer or TokenActQuantizer, "
                             f"got {type(aq).__name__}")
        if getattr(self, "mode", None) == "int8_static" and not isinstance(aq, ActQuantizer):
            raise ValueError("an int8_static layer needs its per-tensor input quantizer; set_mode('weight_only') first")
        self.input_quant = aq

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer multiplies it: fake-quantized by ``input_quant`` when it has one."""
        return x if self.input_quant is None else self.input_quant.fake_quantize(x)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (original shape and dtype): equal to ``QuantizedWeight.dequantize()``."""
        if self._wcache is not None:
            return self._wcache
        w = self.packed.dequantize()
        if self.cache_dequantized:
            self._wcache = w
        return w

    def clear_cache(self) -> None:
        """Drop the dequantized float weight kept by ``cache_dequantized``."""
        self._wcache = None

    # ---- modes ----------------------------------------------------------------------------

    def int8_eligible(self) -> str | None:
        """None when the int8 dynamic path can run, else the reason it cannot."""
        p = self.packed
        g = p.granularity
        if not p.layout.codes_are_weights:
            return f"needs uniform weights, this layer's are {p.layout.weight_kind}-quantized"
        if p.spec.fp8 is not None:
            return f"needs 8-bit integer weights, this layer's are {p.spec.kind} floats"
        if not p.int8_codes:
            return f"needs 8-bit weights, one byte per code; this layer has {p.bits} bits ({p.layout.name} layout)"
        if g.kind == "group":
            return "needs per-tensor or per-output-channel scales, not groups"
        if g.kind == "channel" and g.axis % len(self.weight_shape) != 0:
            return f"needs per-output-channel scales (axis 0), not axis {g.axis}"
        return self._int8_layer_reason()

    def _int8_layer_reason(self) -> str | None:
        return None

    def set_mode(self, mode: str) -> None:
        """Select the forward path: ``"weight_only"``, ``"int8_dynamic"`` or ``"int8_static"`` (the input
        quantizer's codes, integer end to end; needs ``input_quant`` at 8 bits or fewer)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        if mode == "int8_static" and self.input_quant is None:
            raise ValueError("int8_static mode needs an input quantizer (quantize with act_bits)")
        if mode == "int8_static" and not isinstance(self.input_quant, ActQuantizer):
            raise ValueError("int8_static mode needs a static per-tensor input quantizer; this layer's is per-token "
                             "(int8_dynamic quantizes each row at run time)")
        if mode == "int8_static" and self.input_quant.grid != "int":
            raise ValueError(f"int8_static mode needs an integer input quantizer, this one is {self.input_quant.grid}")
        if mode in ("int8_dynamic", "int8_static"):
            why = self.int8_eligible()
            if why is not None:
                raise ValueError(f"{mode} mode {why}")
            w8 = self.packed.codes  # (N, K) int8
            self._colsum = w8.to(torch.int64).sum(dim=1).to(torch.float64)  # (N,) Σ_k (u − 128)
        else:
            self._colsum = None
        self.mode = mode

    def _int8_matmul(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x2 (M, K) float → (M, N): activations quantized per row (asymmetric 8-bit), int8 product."""
        xa = quantize_activations_dynamic(x2, 8, symmetric=False)  # q (M, K) uint8, scale/zp (M, 1)
        a8 = (xa.q ^ 0x80).view(torch.int8)  # (M, K) q − 128
        z_a = xa.zero_point.to(torch.float64).reshape(-1, 1) - 128.0  # (M, 1)
        return self._int8_product(a8, xa.scale, z_a, out_dtype)

    def _static_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input quantizer's codes of ``x`` as int8 (u − 128, same shape), its scale and its
        shifted zero point (Z − 128), both float64 (1, 1)."""
        aq = self.input_quant
        a8 = (aq.codes(x) ^ 0x80).view(torch.int8)  # (…) u − 128
        s_a = torch.tensor([[aq.scale]], dtype=torch.float64, device=x.device)  # (1, 1)
        z_a = torch.tensor([[aq.zero_point - 128.0]], dtype=torch.float64, device=x.device)  # (1, 1)
        return a8, s_a, z_a

    def _int8_product(self, a8: torch.Tensor, s_a: torch.Tensor, z_a: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
        """(s_a·(a8 − z_a)) @ dequantized Wᵀ for int8 codes a8 (M, K); ``z_a`` None means 0.

        The zero-point expansion of ``core.intmatmul.int_matmul``, in float64, with the int8
        product from ``torch._int_mm`` (int32 accumulation) or ``core.intmatmul.integer_product``.
        """
        w8 = self.packed.codes  # (N, K) int8 = u − 128
        K = w8.shape[1]
        bracket = _int8_mm(a8, w8.t()).to(torch.float64)  # (M, N) exact integers
        z_b = self.packed.zero_point_tensor().to(torch.float64).reshape(1, -1) - 128.0  # (1, N) or (1, 1)
        if z_a is not None:
            bracket = bracket - z_a * self._colsum.reshape(1, -1)
        if bool((z_b != 0).any()):
            rowsum_a = a8.to(torch.int64).sum(dim=1, keepdim=True).to(torch.float64)  # (M, 1)
            bracket = bracket - rowsum_a * z_b
            if z_a is not None:
                bracket = bracket + K * (z_a * z_b)
        s_b = self.packed.scale.to(torch.float64).reshape(1, -1)  # (1, N) or (1, 1)
        return ((s_a.to(torch.float64).reshape(-1, 1) * s_b) * bracket).to(out_dtype)

    def _apply(self, fn, *args, **kwargs):  # keep the caches consistent with .to()/.half()
        self._wcache = None
        slot = self.__dict__.get("_ort")
        if slot is not None:
            slot.reset()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        act = "" if self.input_quant is None else f", act_bits={self.input_quant.bits}"
        return f"mode={self.mode}, bias={self.bias is not None}{act}"


class QuantLinear(_QuantLayer):
    """``nn.Linear`` running on packed codes (see the module docstring).

    ``kernel`` picks how the weight-only path multiplies: ``"auto"`` (default) takes onnxruntime's
    MatMulNBits kernel on the packed codes when it can (``nn.ort_kernel``: 4-bit weights with an
    exact MatMulNBits form, onnxruntime installed, a float32 CPU input, no autograd, no tracing, no
    ``cache_dequantized``) and
    the pure-PyTorch path otherwise; ``"torch"`` always takes the PyTorch path; ``"onnxruntime"``
    takes the kernel or raises a one-line ValueError saying why it cannot.  ``kernel_reason(x)``
    says why a call would not take the kernel (None when it would).
    """

    layer_type = "Linear"

    def __init__(self, in_features: int, out_features: int, *, packed: PackedWeight,
                 bias: torch.Tensor | None = None, mode: str = "weight_only", cache_dequantized: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._init_layer((out_features, in_features), packed, bias, mode, cache_dequantized)
        self._ort = OrtLinearSlot()  # the onnxruntime session, built on first use (never saved or copied)
        self.set_kernel(kernel)

    def set_kernel(self, kernel: str) -> None:
        """Choose the weight-only kernel: ``"auto"``, ``"torch"`` or ``"onnxruntime"`` (see the class docstring)."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
        self.kernel = kernel

    def kernel_reason(self, x: torch.Tensor | None = None) -> str | None:
        """None when a weight-only call (on ``x``, if given) takes the onnxruntime kernel, else why not."""
        if self.mode != "weight_only":
            return f"the layer runs in {self.mode} mode"
        if self.kernel == "torch":
            return "kernel='torch' chosen"
        if self.cache_dequantized:
            return "cache_dequantized keeps a float weight, which the PyTorch path uses"
        if self.packed.codes.device.type != "cpu":
            return f"the weight is on {self.packed.codes.device}, the kernel runs on the CPU"
        why = self._ort.reason(self.packed.to_quantized_weight)
        if why is None and x is not None:
            why = call_reason(x, self.bias)
        return why

    @classmethod
    def from_quantized(cls, module: nn.Linear, qweight: QuantizedWeight | None = None, *,
                       mode: str = "weight_only", cache_dequantized: bool = False,
                       kernel: str = "auto") -> "QuantLinear":
        """Build from an ``nn.Linear`` and its ``QuantizedWeight`` (default: ``module.qweight``)."""
        qw = qweight if qweight is not None else getattr(module, "qweight", None)
        if qw is None:
            raise ValueError("the module has no .qweight; pass the QuantizedWeight explicitly")
        packed = PackedWeight.from_quantized(qw, tuple(module.weight.shape))
        layer = cls(module.in_features, module.out_features, packed=packed, bias=module.bias, mode=mode,
                    cache_dequantized=cache_dequantized, kernel=kernel)
        layer.set_input_quant(getattr(module, "act_quant", None))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8_static":  # integer end to end: the input quantizer's codes × the weight codes
            lead = x.shape[:-1]
            a8, s_a, z_a = self._static_codes(x.reshape(-1, self.in_features))  # (M, K) int8
            y = self._int8_product(a8, s_a, z_a, x.dtype)  # (M, N)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*lead, self.out_features)
        x = self._quant_input(x)
        if self.mode == "int8_dynamic":
            lead = x.shape[:-1]
            y = self._int8_matmul(x.reshape(-1, self.in_features), x.dtype)  # (M, N)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*lead, self.out_features)
        if self.kernel != "torch":
            why = self.kernel_reason(x)
            if why is None:
                return self._ort_linear(x)
            if self.kernel == "onnxruntime":
                raise ValueError(f"kernel='onnxruntime' cannot run: {why}")
        n = self.out_features * self.in_features
        if self._wcache is not None or self.cache_dequantized or n <= CHUNK_WEIGHTS or not self.packed.row_chunks:
            w = self.dequantized_weight()
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self._chunked_linear(x)

    def _ort_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (…, K) → (…, N) through onnxruntime's MatMulNBits kernel on the packed codes."""
        lead = x.shape[:-1]
        y = self._ort.run(self.packed.to_quantized_weight, x.reshape(-1, self.in_features))  # (M, N)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)

    def _rows_chunk(self) -> int:
        rows = max(8, CHUNK_WEIGHTS // max(1, self.in_features))
        return rows - rows % 8  # 8 rows of codes always start on a byte boundary

    def _chunked_linear(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear with the weight dequantized ``_rows_chunk()`` output rows at a time.

        Each chunk's weight is computed exactly as ``dequantized_weight()`` computes it; each output
        is still one dot product over all inputs, so the result is the same as one F.linear
        (bit-identical with the BLAS here, checked by the tests) while the float weight never
        exists whole: a chunk stays in cache and the layer's memory stays the packed size.
        """
        N = self.out_features
        y = x.new_empty(*x.shape[:-1], N)
        step = self._rows_chunk()
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            w = self.packed.dequantize_rows(r0, r1)  # (rows, K) in the weight's dtype
            b = None if self.bias is None else self.bias[r0:r1].to(x.dtype)
            y[..., r0:r1] = F.linear(x, w.to(x.dtype), b)
        return y


class _QuantConvNd(_QuantLayer):
    """Shared parts of the packed convolutions."""

    _dims = 2
    _conv = staticmethod(F.conv2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", *, packed: PackedWeight,
                 bias: torch.Tensor | None = None, mode: str = "weight_only", cache_dequantized: bool = False):
        super().__init__()
        d = self._dims

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d

        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = tup(kernel_size), tup(stride), tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self.padding_mode = padding_mode
        if padding_mode != "zeros" and isinstance(self.padding, str):
            raise ValueError("string padding with a non-zeros padding_mode is not supported")
        if padding_mode != "zeros":
            self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_layer(shape, packed, bias, mode, cache_dequantized)

    @classmethod
    def from_quantized(cls, module: nn.Module, qweight: QuantizedWeight | None = None, *,
                       mode: str = "weight_only", cache_dequantized: bool = False):
        """Build from an ``nn.Conv*d`` and its ``QuantizedWeight`` (default: ``module.qweight``)."""
        qw = qweight if qweight is not None else getattr(module, "qweight", None)
        if qw is None:
            raise ValueError("the module has no .qweight; pass the QuantizedWeight explicitly")
        if getattr(module, "transposed", False):
            raise ValueError("transposed convolutions are not supported")
        packed = PackedWeight.from_quantized(qw, tuple(module.weight.shape))
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.padding_mode, packed=packed, bias=module.bias, mode=mode,
                    cache_dequantized=cache_dequantized)
        layer.set_input_quant(getattr(module, "act_quant", None))
        return layer

    def _int8_layer_reason(self) -> str | None:
        if self._dims != 2:
            return "runs on Linear and Conv2d layers only"
        if self.groups != 1:
            return f"needs groups=1, this convolution has groups={self.groups}"
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return "needs numeric zero padding"
        return None

    def _pad_input(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self.padding_mode != "zeros":
            pad = [0] * self._dims
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), pad
        return x, self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8_static":
            return self._int8_static_conv(x)
        x = self._quant_input(x)
        if self.mode == "int8_dynamic":
            return self._int8_conv(x)
        x, padding = self._pad_input(x)
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv(x, w, b, self.stride, padding, self.dilation, self.groups)

    def _int8_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Activations quantized per sample, symmetric 8-bit (so zero padding stays exactly 0),
        *before* im2col; then W (N, K) @ patches (K, B·L) as one int8 product, which lands in the
        output's (channel, position) order without transposing the 9× larger patch matrix."""
        B, _, H, W = x.shape
        xa = quantize_activations_dynamic(x.reshape(B, -1), 8, symmetric=True)  # codes 1..255, zp 128
        a = (xa.q ^ 0x80).view(torch.int8).reshape(x.shape).to(x.dtype)  # (B, C, H, W) in −127..127
        cols = F.unfold(a, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, K, L)
        K, L = cols.shape[1], cols.shape[2]
        a8t = cols.to(torch.int8).permute(1, 0, 2).reshape(K, B * L)  # (K, B·L) exact small integers
        bracket = _int8_mm(self.packed.codes, a8t).to(torch.float64)  # (N, B·L)
        z_b = self.packed.zero_point_tensor().to(torch.float64).reshape(-1, 1) - 128.0  # (N, 1) or (1, 1)
        if bool((z_b != 0).any()):
            colsum_a = a8t.to(torch.int64).sum(dim=0, keepdim=True).to(torch.float64)  # (1, B·L)
            bracket = bracket - z_b * colsum_a
        s_a = xa.scale.to(torch.float64).reshape(B, 1).expand(B, L).reshape(1, B * L)  # (1, B·L)
        s_b = self.packed.scale.to(torch.float64).reshape(-1, 1)  # (N, 1) or (1, 1)
        y = ((s_b * s_a) * bracket).to(x.dtype).reshape(-1, B, L).permute(1, 0, 2)  # (B, N, L)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).reshape(1, -1, 1)
        (ph, pw), (dh, dw), (kh, kw), (sh, sw) = self.padding, self.dilation, self.kernel_size, self.stride
        ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return y.reshape(B, self.out_channels, ho, wo)

    def _int8_static_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The input quantizer's codes (u − 128 as int8), padded with the code of 0.0 (Z − 128) so that
        padding is exactly 0, unfolded; W (N, K) @ patches (K, B·L) as one int8 product with the
        zero-point expansion of ``core.intmatmul`` (int32 accumulation, bracket in float64)."""
        B, _, H, W = x.shape
        a8, s_a, z_a = self._static_codes(x)  # (B, C, H, W) int8
        (ph, pw), (dh, dw), (kh, kw), (sh, sw) = self.padding, self.dilation, self.kernel_size, self.stride
        a = F.pad(a8.to(x.dtype), (pw, pw, ph, ph), value=float(z_a)) if ph or pw else a8.to(x.dtype)
        cols = F.unfold(a, self.kernel_size, self.dilation, 0, self.stride)  # (B, K, L) small exact integers
        K, L = cols.shape[1], cols.shape[2]
        a8t = cols.to(torch.int8).permute(1, 0, 2).reshape(K, B * L)  # (K, B·L)
        w8 = self.packed.codes  # (N, K) int8 = u − 128
        bracket = _int8_mm(w8, a8t).to(torch.float64)  # (N, B·L) exact integers
        bracket = bracket - z_a * self._colsum.reshape(-1, 1)  # Z_A·Σ_k w
        z_b = self.packed.zero_point_tensor().to(torch.float64).reshape(-1, 1) - 128.0  # (N, 1) or (1, 1)
        if bool((z_b != 0).any()):
            colsum_a = a8t.to(torch.int64).sum(dim=0, keepdim=True).to(torch.float64)  # (1, B·L)
            bracket = bracket - z_b * colsum_a + K * (z_a * z_b)
        s_b = self.packed.scale.to(torch.float64).reshape(-1, 1)  # (N, 1) or (1, 1)
        y = ((s_a * s_b) * bracket).to(x.dtype).reshape(-1, B, L).permute(1, 0, 2)  # (B, N, L)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).reshape(1, -1, 1)
        ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return y.reshape(B, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                + super().extra_repr())


class QuantConv2d(_QuantConvNd):
    """``nn.Conv2d`` running on packed codes (see the module docstring)."""

    layer_type = "Conv2d"
    _dims = 2
    _conv = staticmethod(F.conv2d)


class QuantConv1d(_QuantConvNd):
    """``nn.Conv1d`` running on packed codes (weight-only path)."""

    layer_type = "Conv1d"
    _dims = 1
    _conv = staticmethod(F.conv1d)


QUANT_LAYER_FOR = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Conv1d: QuantConv1d}
QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantConv1d)


def quant_layer_class(module: nn.Module) -> type[_QuantLayer]:
    """The packed layer type that replaces ``module`` (exact type match on Linear/Conv1d/Conv2d)."""
    for base, cls in QUANT_LAYER_FOR.items():
        if type(module) is base or isinstance(module, base):
            return cls
    raise ValueError(f"no packed layer for {type(module).__name__}; supported: Linear, Conv1d, Conv2d")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


INT8_CHOICES = (False, True, "linear", "all")


def wants_int8(layer: _QuantLayer, int8_dynamic: bool | str) -> bool:
    """Whether ``int8_dynamic`` (False, True/"linear", "all") puts ``layer`` on the int8 path."""
    if int8_dynamic not in INT8_CHOICES:
        raise ValueError(f"int8_dynamic must be False, True, 'linear' or 'all', got {int8_dynamic!r}")
    if not int8_dynamic or layer.int8_eligible() is not None:
        return False
    return int8_dynamic == "all" or isinstance(layer, QuantLinear)


def convert(model: nn.Module, *, int8_dynamic: bool | str = False, cache_dequantized: bool = False,
            kernel: str = "auto") -> nn.Module:
    """Swap every module that has ``.qweight`` for its packed layer, in place; returns ``model``.

    ``int8_dynamic``: ``True`` (or ``"linear"``) runs the 8-bit Linear layers with per-tensor or
    per-channel scales on the int8 dynamic path; ``"all"`` also the Conv2d layers (groups=1),
    which go through im2col and are slower than the float convolution on CPU (see the size_speed
    benchmark); the other layers stay weight-only.  A model whose root module itself has
    ``.qweight`` is returned converted (not in place, there being no parent to put it in).
    ``kernel``: the Linear layers' weight-only kernel (``QuantLinear``: "auto", "torch" or "onnxruntime").
    """
    if int8_dynamic not in INT8_CHOICES:
        raise ValueError(f"int8_dynamic must be False, True, 'linear' or 'all', got {int8_dynamic!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    targets = [(n, m) for n, m in model.named_modules() if getattr(m, "qweight", None) is not None
               and not isinstance(m, _QuantLayer)]
    for name, mod in targets:
        cls = quant_layer_class(mod)
        try:
            extra = {"kernel": kernel} if cls is QuantLinear else {}
            layer = cls.from_quantized(mod, mod.qweight, cache_dequantized=cache_dequantized, **extra)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e}") from None
        if wants_int8(layer, int8_dynamic):
            layer.set_mode("int8_dynamic")
        layer.to(mod.weight.device)
        layer.train(mod.training)
        if name == "":
            return layer
        _set_module(model, name, layer)
    return model


def set_int8_static(model: nn.Module) -> list[str]:
    """Put every packed layer that can run integer end to end (``input_quant`` set, 8-bit weights one
    byte per code, per-tensor or per-channel scales; Conv2d with groups=1) in ``"int8_static"``
    mode; returns their names (the others keep their mode)."""
    done = []
    for name, mod in model.named_modules():
        aq = getattr(mod, "input_quant", None)
        if isinstance(mod, _QuantLayer) and isinstance(aq, ActQuantizer) and aq.grid == "int" \
                and mod.int8_eligible() is None:
            mod.set_mode("int8_static")
            done.append(name)
    return done


def memory_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor the module holds (parameters and buffers, caches included)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
