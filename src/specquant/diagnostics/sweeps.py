"""Diagnostics that the run-folder plots read: κ per layer, and the data-free frame ΣΔ weight
error against redundancy. They read weights and change nothing."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from specquant.algorithms.frame import FrameConfig
from specquant.algorithms.frame import quantize_weight as frame_quantize
from specquant.core.spectral import condition_number
from specquant.engine.walk import quantizable_layers


def layer_kappas(model: torch.nn.Module, names: Iterable[str]) -> dict[str, float]:
    """κ(W) = σ_max/σ_min of each named layer's current weight (conv viewed as (out, in·kh·kw))."""
    mods = dict(model.named_modules())
    return {n: condition_number(mods[n].weight.detach()) for n in names if n in mods}


def frame_redundancy_sweep(model: torch.nn.Module, bits: int, redundancies: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0),
                           *, names: Iterable[str] | None = None, **frame_options) -> dict:
    """Weight error of frame ΣΔ quantization against redundancy, layer by layer (data-free).

    For each redundancy r, every layer's weight W (the float weights of ``model``; conv viewed as
    (out, in·kh·kw)) is quantized with ``FrameConfig(bits=bits, redundancy=r, **frame_options)``
    and the relative error ‖W − Ŵ‖_F/‖W‖_F is recorded with the true bits per weight.
    Returns {"bits", "redundancy": [...], "layers": {name: [err per r]}, "overall": [...],
    "bits_per_weight": [...]} where "overall" is sqrt(Σ‖W − Ŵ‖²/Σ‖W‖²) over the layers.
    """
    mods = [(n, m) for n, m in quantizable_layers(model) if names is None or n in set(names)]
    out = {"bits": bits, "redundancy": [float(r) for r in redundancies], "layers": {n: [] for n, _ in mods},
           "overall": [], "bits_per_weight": []}
    for r in redundancies:
        cfg = FrameConfig(bits=bits, redundancy=float(r), **frame_options)
        num = den = 0.0
        storage = weights = 0.0
        for n, m in mods:
            W = m.weight.detach().reshape(m.weight.shape[0], -1).double()
            qw = frame_quantize(W, None, cfg)
            W_hat = qw.dequantize().reshape(W.shape).double()
            e2, w2 = float((W - W_hat).pow(2).sum()), float(W.pow(2).sum())
            out["layers"][n].append((e2 / w2) ** 0.5 if w2 > 0 else 0.0)
            num, den = num + e2, den + w2
            storage += qw.bits_per_weight() * W.numel()
            weights += W.numel()
        out["overall"].append((num / den) ** 0.5 if den > 0 else 0.0)
        out["bits_per_weight"].append(storage / weights if weights else 0.0)
    return out
