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

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def levels(self) -> int:
        return self.spec.levels

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
        """True storage: bits of the codes plus one scale per block (and a zero point when asymmetric)."""
        n_params = self.scale.numel() * (1 if self.spec.symmetric else 2)
        return self.codes.numel() * self.spec.bits + n_params * scale_bits

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        return self.storage_bits(scale_bits) / max(1, self.num_weights())
