"""Input quantizers of quantized layers: calibrated on a layer's inputs, installed as a hook.

With ``config.act_bits`` the engine gives every layer it quantizes a static per-tensor input
quantizer (``core.actquant.ActQuantizer``) *before* the layer's weight algorithm runs:

1. a seeded sample of at most ``core.actquant.ACT_SAMPLE`` values of the layer's inputs, drawn
   batch by batch (the memory stays bounded for large convolution inputs): the inputs X̃ of the
   partly quantized model (``act_source="quantized"``, the default: what the layer will see at
   run time, every earlier layer's weights and input quantizers applied) or the float model's X
   (``act_source="float"``);
2. ``core.actquant.calibrate_activation`` chooses the range with the configured calibrator;
3. the module gets ``.act_quant`` and a forward pre-hook that fake-quantizes its input, so the
   layer's own statistics (H = X̃ᵀX̃, G = X̃ᵀX) and every later layer's X̃ stream carry the
   quantized activations.  ``specquant.nn.convert`` and ``specquant.save`` carry ``.act_quant``
   into the packed layer (``input_quant``), which applies the same float operations.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from specquant.core.actquant import ACT_SAMPLE, ActQuantizer, calibrate_activation, sample_values
from specquant.engine.calibrate import capture_layer_inputs


def _fake_quant_input(mod: nn.Module, args: tuple):
    """Forward pre-hook: the module's first input through its ``act_quant``."""
    aq = getattr(mod, "act_quant", None)
    if aq is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (aq.fake_quantize(args[0]), *args[1:])


def install_input_quantizer(mod: nn.Module, aq: ActQuantizer) -> None:
    """Give ``mod`` the input quantizer ``aq`` (``mod.act_quant``) and the hook that applies it (once)."""
    mod.act_quant = aq
    if not getattr(mod, "_act_quant_hooked", False):
        mod.register_forward_pre_hook(_fake_quant_input)
        mod._act_quant_hooked = True


def layer_input_sample(f_raw: list[torch.Tensor], qblock: nn.Module | None, qlayer: nn.Module | None, q_inputs,
                       seed: int, k: int = ACT_SAMPLE) -> torch.Tensor:
    """A seeded sample (1-D, at most about ``k`` values) of a layer's inputs over the calibration batches.

    ``f_raw``: the layer's float-model inputs, one tensor per batch (their sizes set each batch's
    share).  With ``qblock``/``qlayer``/``q_inputs`` the sample is of the partly quantized model's
    inputs, captured one batch at a time by re-running the block; else of ``f_raw`` itself."""
    total = sum(x.numel() for x in f_raw)
    parts = []
    for i, x in enumerate(f_raw):
        if qblock is not None:
            x = capture_layer_inputs(qblock, qlayer, [q_inputs[i]])[0]
        m = max(1, math.ceil(k * x.numel() / max(total, 1)))
        parts.append(sample_values([x], m, seed + i))
    return torch.cat(parts)


def calibrate_input_quantizer(name: str, values: torch.Tensor, bits: int, calibrator: str,
                              grid: str = "int") -> ActQuantizer:
    """The layer's input quantizer from its sample; errors name the layer."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"layer '{name}': its input holds NaN/inf; cannot calibrate its activation quantizer")
    try:
        return calibrate_activation(values, bits, calibrator, grid=grid)
    except ValueError as e:
        raise ValueError(f"layer '{name}': activation calibration: {e}") from None
