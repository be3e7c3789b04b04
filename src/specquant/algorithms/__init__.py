"""The quantization methods: one file each, each a pure ``quantize_weight(W, stats, config, ctx)``
registered with its config type (see ``algorithms.base``).  Importing this package imports the
built-in methods, which registers them, in this order: rtn, gpfq, spfq, gptq, qronos, frame, awq.
Any method also runs with the AWQ pre-step (``config.awq = True``, the name "awq+NAME" in
``make_config``); "awq" itself is AWQ scales, then its clipping search and round-to-nearest."""
# isort: off
# Importing a method's module registers it: this order is the order of method_names().
from specquant.algorithms import rtn, gpfq, spfq, gptq, qronos, frame, awq  # noqa: F401
# isort: on
from specquant.algorithms.awq import AWQConfig
from specquant.algorithms.base import (
    LayerStats,
    Method,
    ModuleSettings,
    QuantConfig,
    QuantContext,
    ResolvedSettings,
    get_method,
    make_config,
    method_choices,
    method_names,
    register_method,
)
from specquant.algorithms.frame import FrameConfig
from specquant.algorithms.gpfq import GPFQConfig
from specquant.algorithms.gptq import GPTQConfig
from specquant.algorithms.qronos import QronosConfig
from specquant.algorithms.rtn import RTNConfig
from specquant.algorithms.spfq import SPFQConfig

__all__ = [
    "LayerStats", "QuantConfig", "ModuleSettings", "ResolvedSettings", "QuantContext", "Method",
    "register_method", "get_method", "method_names", "method_choices", "make_config",
    "RTNConfig", "GPFQConfig", "SPFQConfig", "GPTQConfig", "QronosConfig", "FrameConfig", "AWQConfig",
]
