"""specquant: post-training quantization of PyTorch networks with theory-backed algorithms."""
from specquant.core.grid import Granularity, GridSpec
from specquant.core.quantized import QuantizedWeight
from specquant.core.quantizer import quantize_tensor

__version__ = "0.1.0"

__all__ = ["Granularity", "GridSpec", "QuantizedWeight", "quantize_tensor", "__version__"]
