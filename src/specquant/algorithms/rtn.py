"""Round-to-nearest (RTN) with a calibrated range: the baseline every method is compared to.

Reference: Nagel et al., "A White Paper on Neural Network Quantization", arXiv 2106.08295 (2021).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specquant.algorithms.base import LayerStats, QuantConfig, QuantContext, register_method
from specquant.algorithms.common import choose_scales, to_quantized_weight
from specquant.core.grid import fake_quantize
from specquant.core.qweight import QuantizedWeight


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest on a calibrated grid."""

    scale_rule: str = "mse"  # range calibrator (core.clipping names) or "output-mse" (needs calibration data)

    method = "rtn"
    needs_data = False


def quantize_weight(W: torch.Tensor, stats: LayerStats | None, config: RTNConfig, ctx: QuantContext | None = None
                    ) -> QuantizedWeight:
    """Round each weight of ``W`` (out, N0) to the nearest grid point.  Pure function.

    ``stats`` is used only by the "output-mse" scale rule; ``ctx`` is not used."""
    spec = config.grid_spec()
    gran = config.granularity
    H = stats.H if stats is not None else None
    scale, zp = choose_scales(W, spec, gran, config.scale_rule, H, store=config.scale_dtype)
    blocked = gran.to_blocks(W.double())  # blocked_shape, a shorter last group padded
    W_hat = gran.from_blocks(fake_quantize(blocked, scale.double(), zp.double(), spec), tuple(W.shape))
    return to_quantized_weight(W_hat, scale, zp, spec, gran, "rtn", {"scale_rule": config.scale_rule}, W.dtype,
                               config.scale_dtype)


register_method("rtn", RTNConfig, quantize_weight, "round-to-nearest on a calibrated grid (data-free)")
