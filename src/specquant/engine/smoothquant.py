"""The SmoothQuant pre-step on a model: migrate activation outliers into the weights, function kept.

Reference: Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023.  The scales are ``algorithms/smoothquant.smoothquant_scales``
(pure); the groups and the fold are AWQ's (``engine/awq.py``), the same operation with other
scales:

1. ``find_awq_groups``: the ``nn.Linear`` layers reading one input tensor and the module producing
   it (a norm, a gated MLP's ``up_proj``, a Linear); groups that cannot be folded keep their
   reason and are skipped.
2. max |x_j| per input channel of every foldable group, from the float model on the calibration
   batches (one pass, stopped after the last group; each fold keeps the function, so the inputs
   of one group do not depend on the folds of the others).
3. per group, in forward order: s = max|X_j|^α / max|W_j|^(1−α) over the group's current weights
   (stacked), folded (W[:, j]·s_j, the producer's channel j / s_j); then one check that the probe
   batch's output did not move beyond rounding.  When it did, every fold is undone and the groups
   are folded again one at a time, each checked on the probe output (a fold that moves it is
   undone, with the reason): one probe pass in the usual case instead of one per group.

Convolutions are not smoothed (each gets a record with that reason; a conv → ReLU → conv fold,
possible since ReLU commutes with positive scales, is not implemented), and a CNN's Linear head
reads a pooled tensor with no producer to fold into (skipped with that reason): language models
are the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specquant.algorithms.base import QuantConfig
from specquant.algorithms.smoothquant import smoothquant_scales
from specquant.engine.awq import (
    DEFAULT_STAT_BYTES,
    capture_group_inputs,
    fold_all_checked,
    fold_awq,
    groups_on_data,
    probe_output,
)
from specquant.engine.walk import quantizable_layers

CONV_REASON = ("a convolution's input is not smoothed: only groups of Linear layers are folded "
               "(a conv → ReLU → conv fold is not implemented)")


@dataclass
class SmoothQuantRecord:
    """What the SmoothQuant pre-step did to one group of layers reading one input."""

    layers: list[str]  # the Linear layers sharing the input
    predecessor: str | None  # the module that absorbed 1/s (None when none could)
    kind: str | None  # "norm" | "up_proj" | "linear" (None when none could)
    alpha: float | None  # the migration strength used (None when skipped)
    act_max: float | None  # max over channels of max |x_j| before the fold (calibration data)
    act_max_after: float | None  # the same for the smoothed input x_j / s_j
    weight_max: float | None  # max |W| over the group's weights before the fold
    weight_max_after: float | None  # max |W·s| after it
    folded: bool = False  # whether the scales were folded into the model
    reason: str | None = None  # why the group was skipped (None when folded)


@dataclass
class _AbsMax:
    """Running max |x_j| per channel of one group's input."""

    amax: torch.Tensor  # (N0,) float64

    @classmethod
    def empty(cls, x: torch.Tensor) -> "_AbsMax":
        return cls(torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device))

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1])  # (m, N0)
        torch.maximum(self.amax, X.abs().amax(dim=0).double(), out=self.amax)


def apply_smoothquant(model: nn.Module, config: QuantConfig, batches, example=None, *,
                      fold_batch_bytes: int = DEFAULT_STAT_BYTES) -> list[SmoothQuantRecord]:
    """Fold SmoothQuant scales with α = ``config.smoothquant`` into ``model`` in place (float
    function unchanged); one record per group of Linear layers sharing an input, in forward order,
    then one per convolution (skipped, ``CONV_REASON``).

    Args:
        model: the float model, in eval mode (BatchNorm folded, nothing quantized yet).
        config: its ``smoothquant`` is α; groups whose layers are all left in float are skipped.
        batches: calibration inputs (a list of tensors, as ``calibrate.as_batches`` gives).
        example: the probe batch (default: the first two samples of the first batch); its output
            is checked after the folds, and a fold that moves it more than rounding does is undone
            (the group is then skipped with the reason).
        fold_batch_bytes: memory for the copies of the weights that a batch of folds changes (kept to
            undo the batch exactly); one probe per batch (more batches: more probes, same result).
    """
    alpha = config.smoothquant
    if alpha is None:
        return []
    example, mods, groups = groups_on_data(model, batches, example, "SmoothQuant (config.smoothquant)")
    records: list[SmoothQuantRecord] = []
    todo = []
    for g in groups:
        reason = g.reason
        if reason is None and all(config.settings_for(n).skip for n in g.layers):
            reason = "every layer of the group is left in float by the configuration"
        records.append(SmoothQuantRecord(g.layers, g.predecessor if reason is None else None,
                                         g.kind if reason is None else None, None, None, None, None, None,
                                         reason=reason))
        if reason is None:
            todo.append(len(records) - 1)
    records += [SmoothQuantRecord([n], None, None, None, None, None, None, None, reason=CONV_REASON)
                for n, m in quantizable_layers(model) if type(m) is not nn.Linear and not config.settings_for(n).skip]
    if not todo:
        return records
    stats = capture_group_inputs(model, [groups[i] for i in todo], batches, _AbsMax.empty)
    todo = [(i, acc) for i, acc in zip(todo, stats) if _finite(records[i], acc)]
    y0 = probe_output(model, example)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    # Every fold checked through one probe per batch (batches bounded by the copies kept to undo them).
    items = [(groups[i], lambda i=i, acc=acc: _smooth(model, mods, groups[i], records[i], acc, alpha))
             for i, acc in todo]
    reasons, _ = fold_all_checked(model, mods, items, example, y0, dtype, fold_batch_bytes)
    for (i, _), why in zip(todo, reasons):
        rec = records[i]
        rec.folded, rec.reason = why is None, why
        if why is not None:
            rec.act_max_after = rec.weight_max_after = None
    return records


def _finite(rec: SmoothQuantRecord, acc: _AbsMax) -> bool:
    """Whether the group's input statistics are finite; if not, the record says why it is skipped."""
    if bool(torch.isfinite(acc.amax).all()):
        return True
    rec.predecessor = rec.kind = None
    rec.reason = "its input holds NaN/inf on the calibration data"
    return False


def _smooth(model: nn.Module, mods: dict, g, rec: SmoothQuantRecord, acc: _AbsMax, alpha: float) -> None:
    """One group: its scales from its weights as they are now (an earlier fold may have scaled them),
    filled into its record, then folded (``fold_awq``)."""
    Ws = [mods[n].weight.detach() for n in g.layers]  # (out_i, N0) each, as they are now
    try:
        s = smoothquant_scales(acc.amax, Ws, alpha)  # (N0,)
    except ValueError as e:
        raise ValueError(f"SmoothQuant on {', '.join(repr(n) for n in g.layers)}: {e}") from None
    rec.alpha, rec.act_max = alpha, float(acc.amax.max())
    rec.weight_max = max(float(W.abs().max()) for W in Ws)
    rec.weight_max_after = max(float((W.float() * s.to(W.device)[None, :]).abs().max()) for W in Ws)
    rec.act_max_after = float((acc.amax / s.double().to(acc.amax.device)).max())
    fold_awq(model, g.layers, s, g.predecessor)
