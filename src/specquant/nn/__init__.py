"""specquant.nn: layers that run on packed low-bit weights."""
from specquant.nn.layers import (
    MODES,
    QUANT_LAYERS,
    PackedWeight,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    convert,
    memory_bytes,
    set_int8_static,
)

__all__ = [
    "MODES",
    "QUANT_LAYERS",
    "PackedWeight",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "convert",
    "memory_bytes",
    "set_int8_static",
]
