"""The quantization methods: one file each, each a pure ``quantize_weight(W, stats, config)``."""
from specquant.algorithms.base import LayerStats, QuantConfig
from specquant.algorithms.gpfq import GPFQConfig
from specquant.algorithms.gptq import GPTQConfig
from specquant.algorithms.rtn import RTNConfig
from specquant.algorithms.spfq import SPFQConfig


def registry() -> dict:
    """Method name → ``quantize_weight`` function."""
    from specquant.algorithms import gpfq, gptq, rtn, spfq

    reg = {"rtn": rtn.quantize_weight, "gpfq": gpfq.quantize_weight, "spfq": spfq.quantize_weight,
           "gptq": gptq.quantize_weight}
    try:
        from specquant.algorithms import frame
    except ImportError:  # pragma: no cover - frame quantization lands separately
        return reg
    reg["frame"] = frame.quantize_weight
    return reg


__all__ = ["LayerStats", "QuantConfig", "RTNConfig", "GPFQConfig", "SPFQConfig", "GPTQConfig", "registry"]
