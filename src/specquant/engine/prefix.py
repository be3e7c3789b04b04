"""Prefix models: the first k quantizable layers quantized, the rest float.

Mean-field analyses of depth (Schoenholz et al. 2017; for quantized networks Blumenfeld, Gilboa
& Soudry, "A Mean Field Theory of Quantized Deep Networks: The Quantization-Depth Trade-Off",
NeurIPS 2019) ask how many layers a signal crosses before quantization noise swamps it.  The
measurable counterpart: quantize only the first k layers in forward order and watch the
accuracy as k grows.

A sequential method (GPFQ, GPTQ, ...; RTN trivially) quantizes layer j from statistics of the
float model and of the model whose layers before j are already quantized, so layer j's result
does not depend on any layer after it.  One full run therefore holds every prefix model: take
the float model and swap in the quantized weights of the first k layers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def prefix_model(reference: nn.Module, quantized: nn.Module, layers: list[str], k: int) -> nn.Module:
    """A copy of ``reference`` whose layers ``layers[:k]`` carry ``quantized``'s weights and biases.

    ``reference`` is the float model as the quantizer saw it (BatchNorm already folded, so that it
    has the same modules as ``quantized``); ``layers`` are the quantized layers in forward order
    (``QuantReport.layers`` names).  k = 0 gives a copy of ``reference``, k = len(layers) a model
    equal to ``quantized`` (weight-only quantization).  Each swapped layer also gets the quantized
    layer's ``.qweight``.  Neither input is changed.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(layers):
        raise ValueError(f"prefix length k must be an integer in [0, {len(layers)}], got {k!r}")
    ref_mods = dict(reference.named_modules())
    q_mods = dict(quantized.named_modules())
    out = copy.deepcopy(reference)
    out_mods = dict(out.named_modules())
    for name in layers[:k]:
        if name not in ref_mods or name not in q_mods:
            where = "the reference model" if name not in ref_mods else "the quantized model"
            raise ValueError(f"layer '{name}' is not a module of {where}")
        q, dst = q_mods[name], out_mods[name]
        if getattr(q, "act_quant", None) is not None:
            raise ValueError(f"layer '{name}' quantizes its input (act_bits): prefix models are weight-only")
        for pname in ("weight", "bias"):
            src, tgt = getattr(q, pname, None), getattr(dst, pname, None)
            if (src is None) != (tgt is None):
                raise ValueError(f"layer '{name}': {pname} is present in one model only")
            if src is None:
                continue
            if src.shape != tgt.shape:
                raise ValueError(f"layer '{name}': {pname} shape {tuple(src.shape)} in the quantized model, "
                                 f"{tuple(tgt.shape)} in the reference")
            with torch.no_grad():
                tgt.copy_(src)
        if hasattr(q, "qweight"):
            dst.qweight = q.qweight
    return out
