"""specquant: post-training quantization of PyTorch networks with theory-backed algorithms."""
from specquant import qat
from specquant._version import __version__
from specquant.algorithms import AWQConfig, GPFQConfig, GPTQConfig, QronosConfig, QuantConfig, RTNConfig, SPFQConfig
from specquant.core import metrics, spectral
from specquant.core.grid import Granularity, GridSpec
from specquant.core.quantizer import quantize_tensor
from specquant.core.qweight import QuantizedWeight
from specquant.diagnostics.analyze import analyze
from specquant.engine.apply import LayerRecord, QuantReport, quantize
from specquant.export import OnnxExport, export_onnx
from specquant.export.gguf import export_gguf
from specquant.io import load, save
from specquant.outofcore import parse_memory, quantize_folder

__all__ = [
    "Granularity", "GridSpec", "QuantizedWeight", "quantize_tensor", "quantize", "QuantReport", "LayerRecord",
    "QuantConfig", "RTNConfig", "GPFQConfig", "SPFQConfig", "GPTQConfig", "QronosConfig", "AWQConfig", "metrics",
    "spectral",
    "save", "load", "analyze", "export_onnx", "OnnxExport", "export_gguf",
    "qat", "__version__", "quantize_folder", "parse_memory",
]
