"""``allocate``: per-layer bit widths under an average-bits budget, as a per-module settings map.

    alloc = allocate(model, calib, avg_bits=2.5, policy="sensitivity")
    cfg = alloc.apply(GPFQConfig())   # any method of the engine: config.modules gets one entry per layer
    quantize(model, cfg, calib)

The allocation names every layer it covers, so ``config.bits`` only matters for layers it does
not cover.  The budget counts stored code bits of the quantized layers (Σ_l M_l·s(b_l) ≤ B·Σ_l M_l,
s(b) = b except for the 3-level symmetric 2-bit grid, whose codes are stored five per byte:
s = 1.6); scales and zero points come on top, as for a uniform width.

``granularity="channel"`` allocates per output row (channel) instead of per layer: every row of
every layer is a knapsack item with the per-row costs of the sensitivity report, and a layer
whose rows get different widths is quantized row-group by row-group and stored with each row at
its own width (``ModuleSettings.row_bits``; one width byte per row on top).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from specquant.algorithms import RTNConfig
from specquant.algorithms.base import ModuleSettings, QuantConfig
from specquant.core import spectral
from specquant.engine.calibrate import as_batches
from specquant.engine.walk import fold_batchnorm, forward_order, quantizable_layers, resolve_ties
from specquant.io.files import jsonable
from specquant.mixed.policies import (
    DEFAULT_CANDIDATES,
    check_candidates,
    fit_spectral_rule,
    protected_indices,
    spectral_costs,
    storage_map,
)
from specquant.mixed.sensitivity import SensitivityReport, measure_sensitivity
from specquant.mixed.solver import solve_bits

if TYPE_CHECKING:
    from specquant.engine.distributed import Dist

POLICIES = ("sensitivity", "spectral", "spectral-knapsack")
GRANULARITIES = ("layer", "channel")
NOTE_COST = "note model Σ_l M_l·(κ_l·2^-b_l)²"


@dataclass
class LayerAllocation:
    """The width given to one layer."""

    name: str  # module name
    params: int  # M_l, number of weights
    bits: int  # chosen width
    kappa: float  # condition number of the (BN-folded) weight's matrix view
    cost: float | None  # the policy's predicted cost at this width (see Allocation.cost_model)
    protected: bool  # held at the protection width
    stored_bits: float = 0.0  # stored code bits per weight (1.6 for 3-level codes; mixed rows averaged)
    row_bits: tuple[int, ...] | None = None  # each output row's width when the rows differ, else None


@dataclass
class Allocation:
    """Per-layer widths for a budget; :meth:`apply` puts them into any config."""

    policy: str  # "sensitivity", "spectral" or "spectral-knapsack"
    granularity: str  # "layer" (one width per layer) or "channel" (one width per output row)
    budget: float  # B, the average bits per weight allowed
    candidates: tuple[int, ...]  # widths a free layer could get
    layers: list[LayerAllocation]
    cost_model: str  # what the predicted costs measure
    predicted_cost: float  # Σ_l cost_l(b_l) under that model
    b_base: float | None = None  # the spectral rule's fitted offset β ("spectral" only)
    solver: str | None = None  # knapsack solver used ("dp" / "milp"), None for the rule
    protect_bits: int | None = None  # width of protected layers, None without protection
    sensitivity: SensitivityReport | None = field(default=None, repr=False)  # when measured

    @property
    def total_params(self) -> int:
        return sum(a.params for a in self.layers)

    @property
    def avg_bits(self) -> float:
        """Achieved stored code bits Σ_l M_l·s(b_l) / Σ_l M_l (≤ budget)."""
        n = self.total_params
        return sum(a.params * a.stored_bits for a in self.layers) / n if n else 0.0

    @property
    def modules(self) -> dict[str, ModuleSettings]:
        """{module name: ModuleSettings(bits=…, row_bits=…)} for every allocated layer (``bits`` is
        the widest row's width for layers whose rows differ)."""
        return {a.name: ModuleSettings(bits=a.bits, row_bits=a.row_bits) for a in self.layers}

    def apply(self, config: QuantConfig) -> QuantConfig:
        """A copy of ``config`` whose ``modules`` give each allocated layer its width (and per-row
        widths) by exact name.  The config's own widths are replaced: every entry of its map
        loses ``bits`` and ``row_bits`` and keeps the rest (``skip``, ``granularity``); an
        allocated layer keeps the granularity of the entry that applied to it."""
        own = {k: dataclasses.replace(s, bits=None, row_bits=None) for k, s in config.modules.items()}
        base = dataclasses.replace(config, modules=own)
        alloc = {}
        for a in self.layers:
            g = base.settings_for(a.name).granularity
            alloc[a.name] = ModuleSettings(bits=a.bits, row_bits=a.row_bits,
                                           granularity=None if g == config.granularity else g)
        return dataclasses.replace(config, modules={**own, **alloc})

    def to_dict(self) -> dict:
        """Strict-JSON-safe dict (an infinite κ or cost becomes None)."""
        return jsonable({
            "policy": self.policy, "granularity": self.granularity, "budget": self.budget,
            "avg_bits": self.avg_bits,
            "candidates": list(self.candidates), "cost_model": self.cost_model,
            "predicted_cost": self.predicted_cost, "b_base": self.b_base, "solver": self.solver,
            "protect_bits": self.protect_bits, "overrides": {a.name: a.bits for a in self.layers},
            "row_overrides": {a.name: list(a.row_bits) for a in self.layers if a.row_bits is not None},
            "layers": [dataclasses.asdict(a) for a in self.layers],
        })

    def format_table(self) -> str:
        lines = [f"allocation: policy {self.policy} per {self.granularity}, budget {self.budget:g} bits, "
                 f"achieved {self.avg_bits:.4f} (stored code bits per weight)",
                 f"{'layer':<24}{'params':>9}{'kappa':>11}{'bits':>6}{'stored':>8}{'cost':>12}"]
        for a in self.layers:
            cost = "-" if a.cost is None else f"{a.cost:.3g}"
            mark = " (protected)" if a.protected else ""
            if a.row_bits is not None:
                mark += "  rows: " + ", ".join(f"{a.row_bits.count(b)}×{b}" for b in sorted(set(a.row_bits)))
            lines.append(f"{a.name:<24}{a.params:>9}{a.kappa:>11.3g}{a.bits:>6}{a.stored_bits:>8.3f}{cost:>12}{mark}")
        lines.append(f"predicted cost ({self.cost_model}): {self.predicted_cost:.4g}")
        return "\n".join(lines)


def allocate(
    model: nn.Module,
    calib,
    avg_bits: float,
    policy: str = "sensitivity",
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    method_config: QuantConfig | None = None,
    *,
    protect_first_last: bool = False,
    protect_bits: int = 8,
    metric: str = "output",
    labels: torch.Tensor | None = None,
    sensitivity: SensitivityReport | None = None,
    sensitivity_samples: int | None = 256,
    solver: str = "auto",
    fold_bn: bool = True,
    example_input: torch.Tensor | None = None,
    batch_size: int = 128,
    granularity: str = "layer",
    progress: Callable[[int, int], None] | None = None,
    dist: Dist | None = None,
) -> Allocation:
    """Choose a width per layer so that Σ_l M_l·b_l ≤ avg_bits·Σ_l M_l.

    Args:
        model: the float model (not changed; BN is folded on a copy, as the engine does, so κ
            and the sensitivities are those of the weights the engine will quantize).
        calib: calibration inputs; required by ``policy="sensitivity"`` (unless ``sensitivity``
            is given), optional for the spectral policies (used for BN folding and layer order).
        avg_bits: the budget B.
        policy: "sensitivity", "spectral" (the rule ⌈log₂ κ⌉ + b_base fitted to the budget) or
            "spectral-knapsack" (the rule's error model solved exactly); see
            :mod:`specquant.mixed.policies`.
        candidates: widths a layer may get.
        method_config: the engine config whose per-layer quantizer measures sensitivities
            (default ``RTNConfig()``); the layers its ``modules`` skip are left out of the allocation.
        protect_first_last: hold the first and last layers (forward order) at ``protect_bits``.
        metric, labels: the sensitivity metric ("output" or "loss") and optional labels.
        sensitivity: a precomputed :class:`SensitivityReport` (reused across budgets).
        sensitivity_samples: calibration samples used to measure sensitivities (the first ones;
            None: all).  Each (layer, width) costs a forward pass over them.
        solver: knapsack solver, "auto", "dp" or "milp".
        granularity: "layer" (one width per layer) or "channel" (one width per output row;
            policy "sensitivity" only, with the report's per-row costs).
        progress: ``progress(done, total)`` over the sensitivity pass (see :func:`measure_sensitivity`).
        dist: ranks of an initialised process group share the sensitivity pass, layer by layer
            (:func:`measure_sensitivity`); every rank gets the allocation of one process.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown allocation policy {policy!r}; allowed: {', '.join(POLICIES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown allocation granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    if granularity == "channel" and policy != "sensitivity":
        raise ValueError(f"granularity 'channel' needs policy 'sensitivity' (per-row costs), not {policy!r}")
    cands = check_candidates(candidates)
    if isinstance(protect_bits, bool) or not isinstance(protect_bits, int) or not 1 <= protect_bits <= 8:
        raise ValueError(f"protect_bits must be an integer in 1..8, got {protect_bits!r}")
    cfg = method_config if method_config is not None else RTNConfig()
    if granularity == "channel" and cfg.granularity.kind != "channel":
        raise ValueError(f"granularity 'channel' needs a per-channel quantizer, the config has "
                         f"{cfg.granularity.label()!r}")
    storage = storage_map(sorted(set(cands) | {protect_bits}), cfg.symmetric)
    batches = as_batches(calib, batch_size) if calib is not None else None
    example = batches[0] if batches else example_input
    base = copy.deepcopy(model).eval()
    if fold_bn and example is not None:
        fold_batchnorm(base, example)
    names = forward_order(base, example) if example is not None else [n for n, _ in quantizable_layers(base)]
    names = [n for n in names if not cfg.settings_for(n).skip]
    # Layers the engine leaves float or quantizes through another (tied weights) take no bits.
    names = resolve_ties(base, names, lambda n: cfg.settings_for(n).skip).layer_order
    if not names:
        raise ValueError("the model has no quantizable layers to allocate bits to")
    mods = dict(base.named_modules())
    params = [mods[n].weight.numel() for n in names]
    kappas = [spectral.condition_number(mods[n].weight) for n in names]
    prot = protected_indices(len(names), protect_first_last)
    fixed = {i: protect_bits for i in prot}

    b_base = solver_used = None
    row_widths: list[tuple[int, ...] | None] = [None] * len(names)
    if policy == "sensitivity":
        if sensitivity is None:
            if batches is None:
                raise ValueError("policy 'sensitivity' needs calibration data (calib=...) or a sensitivity report")
            free = [n for i, n in enumerate(names) if i not in fixed]
            sens_data = batches
            if sensitivity_samples is not None:
                if isinstance(sensitivity_samples, bool) or not isinstance(sensitivity_samples, int) \
                        or sensitivity_samples < 1:
                    raise ValueError(f"sensitivity_samples must be a positive integer, got {sensitivity_samples!r}")
                sens_data = torch.cat(batches)[:sensitivity_samples]
                if labels is not None:
                    labels = torch.as_tensor(labels)[:sensitivity_samples]
            sensitivity = measure_sensitivity(base, sens_data, cands, cfg, metric=metric, labels=labels,
                                              layers=free, fold_bn=False, batch_size=batch_size, progress=progress,
                                              dist=dist)
        table = {s.name: s.costs for s in sensitivity.layers}
        costs = []
        for i, n in enumerate(names):
            if i in fixed:
                costs.append({})
                continue
            if n not in table:
                raise ValueError(f"the sensitivity report has no entry for layer '{n}'")
            missing = [b for b in cands if b not in table[n]]
            if missing:
                raise ValueError(f"the sensitivity report lacks widths {missing} for layer '{n}'")
            costs.append({b: table[n][b] for b in cands})
        if granularity == "channel":
            bits, row_widths, layer_costs, solver_used = _solve_rows(
                names, params, fixed, sensitivity, cands, avg_bits, solver, storage)
            cost_model = f"sensitivity ({sensitivity.metric}, {sensitivity.method}) split over rows, summed"
        else:
            choice = solve_bits(costs, params, avg_bits, fixed=fixed, solver=solver, storage=storage)
            bits, solver_used = list(choice.bits), choice.solver
            layer_costs = [None if i in fixed else costs[i][b] for i, b in enumerate(bits)]
            cost_model = f"sensitivity ({sensitivity.metric}, {sensitivity.method}), summed over layers"
    elif policy == "spectral-knapsack":
        costs = spectral_costs(kappas, params, cands)
        choice = solve_bits(costs, params, avg_bits, fixed=fixed, solver=solver, storage=storage)
        bits, solver_used = list(choice.bits), choice.solver
        layer_costs = [None if i in fixed else costs[i][b] for i, b in enumerate(bits)]
        cost_model = NOTE_COST
    else:
        fit = fit_spectral_rule(kappas, params, avg_bits, cands, fixed=fixed, storage=storage)
        bits, b_base = list(fit.bits), fit.b_base
        costs = spectral_costs(kappas, params, sorted(set(cands) | {protect_bits}))
        layer_costs = [None if i in fixed else costs[i][b] for i, b in enumerate(bits)]
        cost_model = NOTE_COST
    def stored(b: int, rows: tuple[int, ...] | None) -> float:
        if rows is None:
            return float(storage.get(b, b))
        return float(sum(storage.get(r, r) for r in rows)) / len(rows)

    layers = [
        LayerAllocation(name=n, params=m, bits=int(b), kappa=k, cost=c, protected=i in fixed,
                        stored_bits=stored(int(b), rw), row_bits=rw)
        for i, (n, m, b, k, c, rw) in enumerate(zip(names, params, bits, kappas, layer_costs, row_widths))
    ]
    total = sum(c for c in layer_costs if c is not None and math.isfinite(c))
    return Allocation(
        policy=policy, granularity=granularity, budget=float(avg_bits), candidates=cands, layers=layers,
        cost_model=cost_model,
        predicted_cost=float(total), b_base=b_base, solver=solver_used,
        protect_bits=protect_bits if prot else None, sensitivity=sensitivity,
    )


def _solve_rows(names, params, fixed, sensitivity: SensitivityReport, cands, avg_bits, solver, storage):
    """The knapsack with one item per output row (protected layers: one fixed item each).

    Returns per-layer widths (the widest row's), per-layer row widths (None where every row got
    the same width), per-layer predicted costs (row costs summed; None when protected) and the
    solver used.
    """
    table = {s.name: s for s in sensitivity.layers}
    costs, sizes, owner, fixed_items = [], [], [], {}
    for i, n in enumerate(names):
        if i in fixed:
            fixed_items[len(costs)] = fixed[i]
            costs.append({})
            sizes.append(params[i])
            owner.append(i)
            continue
        s = table.get(n)
        if s is None or not s.row_costs:
            raise ValueError(f"the sensitivity report has no per-row costs for layer '{n}' "
                             f"(measure it with row_costs=True)")
        missing = [b for b in cands if b not in s.row_costs]
        if missing:
            raise ValueError(f"the sensitivity report lacks widths {missing} for layer '{n}'")
        n_rows = len(s.row_costs[cands[0]])
        if n_rows * s.row_len != params[i]:
            raise ValueError(f"layer '{n}': the report's {n_rows} rows of {s.row_len} weights do not match "
                             f"its {params[i]} weights")
        for r in range(n_rows):
            costs.append({b: s.row_costs[b][r] for b in cands})
            sizes.append(s.row_len)
            owner.append(i)
    choice = solve_bits(costs, sizes, avg_bits, fixed=fixed_items, solver=solver, storage=storage)
    per_layer: list[list[int]] = [[] for _ in names]
    layer_costs: list[float | None] = [None if i in fixed else 0.0 for i in range(len(names))]
    for item, (i, b) in enumerate(zip(owner, choice.bits)):
        per_layer[i].append(int(b))
        if i not in fixed:
            layer_costs[i] += costs[item][b]
    bits = [max(ws) for ws in per_layer]
    rows = [None if len(set(ws)) == 1 else tuple(ws) for ws in per_layer]
    return bits, rows, layer_costs, choice.solver
