"""Per-layer sensitivity: the damage done by quantizing one layer alone at each width.

For each layer l and candidate width b, a copy of the (BN-folded) model has *only* layer l
quantized at b bits by the engine (``quantize`` with every other layer skipped through
``config.modules``, so any method of the engine works: RTN, GPFQ, SPFQ, GPTQ, frame), and the
copy is run on the calibration inputs.  Metrics:

``"output"`` relative squared output error Σ_x ‖f(x) − f_Q(x)‖² / Σ_x ‖f(x)‖² (the noise power
    ratio of the logits; squared so that the errors of independently perturbed layers add,
    which is what a sum of per-layer costs in the knapsack assumes).
``"loss"`` cross-entropy increase CE(f_Q) − CE(f), mean over the calibration samples, with the
    given labels, or, without labels, the float model's own predictions as labels (stated in
    ``SensitivityReport.labels``).

Per-row costs (``row_costs=True``, for allocation per output channel): the layer's measured
cost c_l(b) is split over its output rows in proportion to each row's own output error on the
float inputs, e_i(b) = ‖X(w_i − ŵ_i)‖² (conv: summed over positions), i.e.
c_{l,i}(b) = c_l(b)·e_i(b)/Σ_j e_j(b).  This keeps the measured layer total and assumes the rows'
errors reach the network output with the same gain (a gradient-weighted split did no better on
ResNet-20; BENCHMARKS.md, "Mixed precision").

Cost: one forward pass of the whole network over the calibration inputs per (layer, width),
plus the method's own cost for one layer (data-driven methods stream that layer's statistics);
per-row costs add one forward pass per layer, up to that layer, to capture its inputs.

Over several ranks (``dist``, an ``engine.distributed.Dist`` of an initialised process group)
the layers are dealt out: layer k of the measured list on rank k mod world, each measured whole
(every width, its per-row split) by that rank alone, on the same calibration inputs as one
process.  The costs then travel as one float64 vector that is summed over the ranks, every entry
written by exactly one rank (x + 0 = x in floating point), so every rank ends with the report of
one process, number for number.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from specquant.algorithms import RTNConfig
from specquant.algorithms.base import ModuleSettings, QuantConfig
from specquant.engine.apply import quantize
from specquant.engine.calibrate import as_batches, capture_layer_inputs
from specquant.engine.walk import fold_batchnorm, forward_order, model_output, quantizable_layers, resolve_ties
from specquant.mixed.policies import DEFAULT_CANDIDATES, check_candidates

if TYPE_CHECKING:
    from specquant.engine.distributed import Dist

SENSITIVITY_METRICS = ("output", "loss")


@dataclass
class LayerSensitivity:
    """Measured cost of one layer at each width."""

    name: str  # module name
    params: int  # number of weights M_l
    costs: dict[int, float]  # bits -> metric value with only this layer quantized
    row_costs: dict[int, list[float]] | None = None  # bits -> that cost split over output rows, or None
    row_len: int = 0  # weights per output row (M_l / rows)


@dataclass
class SensitivityReport:
    """Per-layer sensitivities of one model."""

    metric: str  # "output" or "loss"
    method: str  # the engine method that quantized each layer
    config: dict  # that method's config
    candidates: tuple[int, ...]  # widths measured
    n_samples: int  # calibration samples used
    labels: str  # "none" (output metric), "given", or "float-predictions"
    baseline: float  # metric of the float model (0 for "output"; the float CE for "loss")
    layers: list[LayerSensitivity] = field(default_factory=list)
    folded_bn: list = field(default_factory=list)  # BN folded before measuring
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.layers]

    def at(self, bits: int) -> list[float]:
        """Each layer's cost at one width (in layer order)."""
        return [s.costs[bits] for s in self.layers]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["candidates"] = list(self.candidates)
        d["layers"] = [{"name": s.name, "params": s.params, "costs": {str(b): c for b, c in s.costs.items()},
                        "row_len": s.row_len,
                        "row_costs": None if s.row_costs is None else {str(b): list(v) for b, v in s.row_costs.items()}}
                       for s in self.layers]
        d["folded_bn"] = [dataclasses.asdict(f) for f in self.folded_bn]
        return d

    def format_table(self) -> str:
        head = f"{'layer':<24}{'params':>9}" + "".join(f"{'b=' + str(b):>11}" for b in self.candidates)
        lines = [f"sensitivity ({self.metric}, {self.method}, {self.n_samples} samples)", head]
        for s in self.layers:
            lines.append(f"{s.name:<24}{s.params:>9}" + "".join(f"{s.costs[b]:>11.3g}" for b in self.candidates))
        return "\n".join(lines)


def _model_output(out) -> torch.Tensor:
    """The tensor a model returns (``engine.walk.model_output``), or a one-line error."""
    t = model_output(out)
    if t is None:
        raise TypeError(f"the model returned {type(out).__name__}; sensitivities need a tensor or logits")
    return t


def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The model's outputs on the batches, (N, -1) float64 (a language model's logits, flattened)."""
    with torch.inference_mode():
        return torch.cat([_model_output(model(x)).reshape(x.shape[0], -1).double() for x in batches])


def _metric(metric: str, ref: torch.Tensor, out: torch.Tensor, labels: torch.Tensor | None,
            base_loss: float) -> float:
    if metric == "output":
        den = float(ref.pow(2).sum())
        return float((out - ref).pow(2).sum()) / den if den > 0 else float((out - ref).pow(2).sum())
    return float(F.cross_entropy(out, labels)) - base_loss


def measure_sensitivity(
    model: nn.Module,
    calib,
    candidates=DEFAULT_CANDIDATES,
    method_config: QuantConfig | None = None,
    *,
    metric: str = "output",
    labels: torch.Tensor | None = None,
    layers: list[str] | None = None,
    fold_bn: bool = True,
    batch_size: int = 128,
    row_costs: bool = True,
    progress: Callable[[int, int], None] | None = None,
    dist: Dist | None = None,
) -> SensitivityReport:
    """Quantize each layer alone at each candidate width and measure the damage.

    Args:
        model: the float model (not changed: a BN-folded deep copy is used).
        calib: calibration inputs (a tensor (N, …), or batches as ``quantize`` accepts).
        candidates: widths to measure.
        method_config: the engine config that quantizes the layer (default ``RTNConfig()``:
            per-channel symmetric, MSE clipping); its ``modules`` are replaced: the layer gets
            width b (and keeps the granularity its entry gave it), every other layer is skipped.
        metric: "output" or "loss" (see the module docstring).
        labels: (N,) int labels for the "loss" metric (default: the float model's predictions).
        layers: names to measure (default: every quantizable layer in forward order that the
            config does not skip).
        row_costs: also split each cost over the layer's output rows (see the module docstring).
        progress: called as ``progress(done, total)`` after each (layer, width) measured, for a
            progress bar with an ETA (the pass is len(layers) × len(candidates) quantizations; over
            ranks, this rank's share).
        dist: several ranks share the pass (see the module docstring); every rank must call with the
            same model, data and arguments, and every rank returns the whole report.
    """
    t0 = time.perf_counter()
    if metric not in SENSITIVITY_METRICS:
        raise ValueError(f"unknown sensitivity metric {metric!r}; allowed: {', '.join(SENSITIVITY_METRICS)}")
    cands = check_candidates(candidates)
    cfg0 = method_config if method_config is not None else RTNConfig()
    if not isinstance(cfg0, QuantConfig):
        raise TypeError(f"method_config must be a specquant config, got {type(cfg0).__name__}")
    batches = as_batches(calib, batch_size)
    base = copy.deepcopy(model).eval()
    folded = fold_batchnorm(base, batches[0]) if fold_bn else []
    order = [n for n in forward_order(base, batches[0]) if not cfg0.settings_for(n).skip]
    order = resolve_ties(base, order, lambda n: cfg0.settings_for(n).skip).layer_order  # as the engine does
    if layers is None:
        layers = order
    else:
        unknown = [n for n in layers if n not in order]
        if unknown:
            raise ValueError(f"not quantizable layers of this model (or skipped): {', '.join(unknown)}")
    all_names = [n for n, _ in quantizable_layers(base)]
    ref = _outputs(base, batches)
    n = ref.shape[0]
    label_kind = "none"
    base_loss = 0.0
    y = None
    if metric == "loss":
        if labels is not None:
            y = torch.as_tensor(labels).long().reshape(-1)
            if y.shape[0] != n:
                raise ValueError(f"{y.shape[0]} labels for {n} calibration samples")
            label_kind = "given"
        else:
            y = ref.argmax(dim=1)
            label_kind = "float-predictions"
        base_loss = float(F.cross_entropy(ref, y))
    data_for_engine = _needs_data(cfg0)
    report = SensitivityReport(
        metric=metric, method=cfg0.method, config=cfg0.to_dict(), candidates=cands, n_samples=n,
        labels=label_kind, baseline=base_loss, folded_bn=folded,
    )
    mods = dict(base.named_modules())
    world, rank = (1, 0) if dist is None else (dist.world, dist.rank)
    mine = [name for k, name in enumerate(layers) if k % world == rank]
    total, done = len(mine) * len(cands), 0
    if progress is not None:
        progress(0, total)
    measured: dict[str, LayerSensitivity] = {}
    for name in mine:
        alone = {m: ModuleSettings(skip=True) for m in all_names if m != name}
        alone[name] = ModuleSettings(granularity=cfg0.settings_for(name).granularity)
        costs, rows = {}, {}
        fmod = mods[name]
        inputs = capture_layer_inputs(base, fmod, [((x,), {}) for x in batches]) if row_costs else None
        for b in cands:
            q = copy.deepcopy(base)
            cfg = dataclasses.replace(cfg0, bits=b, modules=alone)
            # a 2-sample example suffices for the engine's forward checks when it streams no data
            quantize(q, cfg, batches if data_for_engine else None, example_input=batches[0][:2], fold_bn=False,
                     batch_size=batch_size, progress=False)
            costs[b] = _metric(metric, ref, _outputs(q, batches), y, base_loss)
            if inputs is not None:
                delta = (fmod.weight - q.get_submodule(name).weight).detach()  # (out, …) W − Ŵ
                e = _row_errors(fmod, delta, inputs)  # (out,)
                tot = float(e.sum())
                share = e / tot if tot > 0 else torch.full_like(e, 1.0 / e.numel())
                rows[b] = (costs[b] * share).tolist()
            del q
            done += 1
            if progress is not None:
                progress(done, total)
        w = fmod.weight
        measured[name] = LayerSensitivity(name=name, params=w.numel(), costs=costs,
                                          row_costs=rows if row_costs else None, row_len=w.numel() // w.shape[0])
    if dist is not None and world > 1:
        measured = _share(measured, layers, cands, mods, row_costs, dist)
    report.layers = [measured[name] for name in layers]
    report.seconds = time.perf_counter() - t0
    return report


def _share(measured: dict[str, LayerSensitivity], layers: list[str], cands: list[int], mods: dict,
           row_costs: bool, dist: Dist) -> dict[str, LayerSensitivity]:
    """Every rank's measured layers on every rank: one float64 vector (per layer: its cost at each
    width, then its per-row costs at each width), each entry filled by the layer's rank, zero
    elsewhere, summed over the ranks."""
    rows_of = {name: mods[name].weight.shape[0] for name in layers}
    sizes = [len(cands) * (1 + (rows_of[name] if row_costs else 0)) for name in layers]
    flat = torch.zeros(sum(sizes), dtype=torch.float64)  # (Σ sizes,)
    offset = 0
    for name, size in zip(layers, sizes):
        if name in measured:
            m = measured[name]
            vals = [m.costs[b] for b in cands]
            if row_costs:
                vals += [v for b in cands for v in m.row_costs[b]]
            flat[offset:offset + size] = torch.tensor(vals, dtype=torch.float64)
        offset += size
    flat = dist.sum_tensor(flat)
    out, offset = {}, 0
    for name, size in zip(layers, sizes):
        part = flat[offset:offset + size].tolist()
        offset += size
        costs = dict(zip(cands, part[:len(cands)]))
        rows = None
        if row_costs:
            r = rows_of[name]
            rows = {b: part[len(cands) + i * r:len(cands) + (i + 1) * r] for i, b in enumerate(cands)}
        w = mods[name].weight
        out[name] = LayerSensitivity(name=name, params=w.numel(), costs=costs, row_costs=rows,
                                     row_len=w.numel() // w.shape[0])
    return out


def _row_errors(mod: nn.Module, delta: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """(out,) float64 ‖X δ_i‖² per output row: the layer's linear map with weight δ on its inputs."""
    total = torch.zeros(delta.shape[0], dtype=torch.float64)
    with torch.inference_mode():
        for x in inputs:
            if isinstance(mod, nn.Linear):
                y = F.linear(x, delta)  # (…, out)
                total += y.double().pow(2).reshape(-1, delta.shape[0]).sum(0)
            else:  # Conv1d / Conv2d
                y = mod._conv_forward(x, delta, None)  # (B, out, …)
                total += y.double().pow(2).transpose(0, 1).reshape(delta.shape[0], -1).sum(1)
    return total


def _needs_data(cfg: QuantConfig) -> bool:
    return bool(cfg.needs_data) or getattr(cfg, "scale_rule", None) == "output-mse" or cfg.bias_correction
