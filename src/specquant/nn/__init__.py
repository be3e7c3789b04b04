"""specquant.nn: layers that run on packed low-bit weights."""
from specquant.nn.layers import (
    MODES,
    QUANT_LAYERS,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    convert,
    memory_bytes,
    unpack_codes,
)

__all__ = [
    "MODES",
    "QUANT_LAYERS",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "convert",
    "memory_bytes",
    "unpack_codes",
]
