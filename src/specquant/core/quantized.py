"""The result of quantizing one tensor: integer codes plus the grid that gives them values."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specquant.core.grid import Granularity, GridSpec, dequantize_codes


@dataclass
class QuantizedWeight:
    """Codes, scales and zero points of one quantized tensor.

    ``codes`` are unsigned integers in ``[spec.qmin, spec.qmax]`` stored as uint8 in the
    tensor's own shape (bit packing happens only when saving, see ``specquant.core.pack``).
    ``scale`` and ``zero_point`` broadcast against ``granularity.blocked_shape(shape)``.
    """

    codes: torch.Tensor  # uint8, same shape as the original tensor
    scale: torch.Tensor  # float32, granularity.scale_shape(shape)
    zero_point: torch.Tensor  # float32, same shape as scale (half-integers for mid-rise grids)
    spec: GridSpec  # grid kind and bits
    granularity: Granularity  # which elements share a scale
    dtype: torch.dtype = torch.float32  # dtype of the original tensor, restored by dequantize()
    algorithm: str = "rtn"  # name of the method that chose the codes
    info: dict = field(default_factory=dict)  # method settings worth recording (JSON-able values)
    row_bits: torch.Tensor | None = None  # (out,) uint8 width of each output row (mixed rows), else None

    def __post_init__(self) -> None:
        if self.row_bits is not None:
            rb = torch.as_tensor(self.row_bits).reshape(-1).to(torch.uint8)
            if self.granularity.kind != "channel" or self.granularity.axis % max(1, self.codes.dim()) != 0:
                raise ValueError("per-row widths need per-output-channel scales (granularity 'channel', axis 0)")
            if rb.numel() != self.codes.shape[0]:
                raise ValueError(f"row_bits has {rb.numel()} widths for {self.codes.shape[0]} rows")
            if rb.numel() and int(rb.max()) != self.spec.bits:
                raise ValueError(f"the grid's width {self.spec.bits} must be the largest row width {int(rb.max())}")
            self.row_bits = rb

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def levels(self) -> int:
        return self.spec.levels

    def row_grid(self, bits: int) -> GridSpec:
        """The grid of rows of width ``bits`` (mixed rows): the default grid of that width."""
        return GridSpec.default(bits, self.spec.symmetric)

    @property
    def packing(self) -> str:
        """Byte layout of the codes (``core.pack``): "bits", "trits" or "rows"."""
        from specquant.core.pack import packing_for

        return "rows" if self.row_bits is not None else packing_for(self.spec.levels, self.spec.bits)

    def code_bits(self) -> float:
        """Stored bits of the codes alone (ternary codes at 1.6 bits, mixed rows at their widths)."""
        from specquant.core.pack import code_bits

        if self.row_bits is None:
            return self.codes.numel() * code_bits(self.spec.levels, self.spec.bits)
        row_len = self.codes[0].numel() if self.codes.shape[0] else 0
        widths, counts = torch.unique(self.row_bits, return_counts=True)
        return sum(int(n) * row_len * code_bits(self.row_grid(int(b)).levels, int(b))
                   for b, n in zip(widths.tolist(), counts.tolist()))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """Float tensor of the original shape and dtype."""
        blocked = self.granularity.blocked_shape(self.shape)
        c = self.codes.reshape(blocked)
        return dequantize_codes(c, self.scale, self.zero_point).reshape(self.shape).to(self.dtype)

    def num_weights(self) -> int:
        return self.codes.numel()

    def storage_bits(self, scale_bits: int = 16) -> int:
        """True storage: code bits (ternary 1.6 per code) plus one scale per block, a zero point when
        asymmetric or rows mix widths, and one width byte per row for mixed rows."""
        n_params = self.scale.numel() * (1 if self.spec.symmetric and self.row_bits is None else 2)
        extra = 8 * self.row_bits.numel() if self.row_bits is not None else 0  # one width byte per row
        return int(round(self.code_bits())) + n_params * scale_bits + extra

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        return self.storage_bits(scale_bits) / max(1, self.num_weights())
