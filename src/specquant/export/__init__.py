"""specquant.export: writers for other runtimes, exact (codes and scales never re-rounded)."""
from specquant.export.onnx import OnnxExport, OnnxLayer, export_onnx

__all__ = ["OnnxExport", "OnnxLayer", "export_onnx"]
