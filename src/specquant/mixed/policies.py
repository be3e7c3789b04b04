"""Allocation policies: which width each layer gets under an average-bits budget.

The spectral-limits note proposes b_l = ⌈log₂ κ(W_l)⌉ + b_base.  Two readings are offered:

``spectral`` (the rule, literally): b_l = snap(⌈log₂ κ_l + β⌉), snapped up to the nearest
    candidate width (clamped to the largest), with the offset β chosen as the *largest* value
    whose allocation fits the budget.  For an integer β this is exactly ⌈log₂ κ_l⌉ + b_base; a
    real β (found among the finitely many points where some layer changes width) uses the
    budget more fully.  A layer with κ = ∞ (singular to working precision) gets the largest
    candidate, as the rule says.
``spectral-knapsack`` (the rule's error model, solved exactly): the note's per-layer error
    ε_l ∝ κ_l·2^(−b_l) gives the cost c_l(b) = M_l·(κ_l·2^(−b))² (noise power summed over the
    layer's M_l weights).  Minimising Σ_l M_l κ_l² 4^(−b_l) subject to Σ_l M_l b_l = B·Σ_l M_l
    has the continuous optimum b_l = log₂ κ_l + const (set the Lagrangian's derivative to zero:
    M_l κ_l² 4^(−b_l)·2 ln 2 = λ·M_l), i.e. the rule with b_base fitted to the budget; the
    knapsack solves its integer version over the candidates exactly.
``sensitivity``: the knapsack over measured costs (each layer quantized alone at each width,
    :mod:`specquant.mixed.sensitivity`).

Layer protection (an option of every policy): the first and last layers (in forward order)
are held at ``protect_bits``; they count in the budget.

What the measurements say (``benchmarks/mixed_pareto.py``; the figures are in BENCHMARKS.md,
"Mixed precision"): κ does *not* decide how many bits a layer needs.  On ResNet-20 (BN folded)
the lock width ⌈log₂ κ⌉ asks for far more bits than uniform low-bit GPFQ needs; κ is at best
weakly rank-correlated with the measured per-layer sensitivity, and its huge values come from
channels that BN scales to almost zero, which per-channel quantization does not care about.
Allocations from κ fall *below* the uniform Pareto line, while the measured ``sensitivity``
policy lies above it, without reaching uniform 3 bits at 2.5 bits per layer; per output channel
(``allocate(..., granularity="channel")``, ternary codes stored at 1.6 bits) it matches uniform
3 bits at 2.5 bits.  The spectral policies are kept so the claim can be tested; use
``sensitivity`` for real allocations.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from specquant.core.grid import GridSpec
from specquant.core.layouts import grid_code_bits
from specquant.core.spectral import lock_bits  # noqa: F401  re-exported by specquant.mixed
from specquant.mixed.solver import budget_capacity, storage_units

DEFAULT_CANDIDATES = (2, 3, 4, 6, 8)


def check_candidates(candidates: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct widths, each an integer in 1..8; at least one."""
    cs = tuple(candidates)
    if not cs:
        raise ValueError("at least one candidate bit width is needed")
    for b in cs:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"candidate bit widths must be integers in 1..8, got {b!r}")
    return tuple(sorted(set(cs)))


def stored_bits(bits: int, symmetric: bool = True) -> Fraction:
    """Stored code bits per weight of a width on the default grid: the narrow symmetric 2-bit grid
    has 3 levels, packed five codes per byte (8/5 bits); every other width stores ``bits``."""
    g = GridSpec.default(bits, symmetric)
    return grid_code_bits(g)


def storage_map(candidates: Sequence[int], symmetric: bool = True) -> dict[int, Fraction]:
    """{width: stored bits per weight} for the knapsack (:func:`specquant.mixed.solver.solve_bits`)."""
    return {int(b): stored_bits(int(b), symmetric) for b in candidates}


def snap_to_candidates(b: float, candidates: Sequence[int]) -> int:
    """The smallest candidate ≥ b; the largest candidate when b exceeds them all."""
    cs = check_candidates(candidates)
    for c in cs:
        if c >= b:
            return c
    return cs[-1]


def spectral_rule_bits(kappas: Sequence[float], b_base: float, candidates: Sequence[int]) -> list[int]:
    """b_l = snap(⌈log₂ κ_l + b_base⌉) (= ⌈log₂ κ_l⌉ + b_base for an integer b_base)."""
    cs = check_candidates(candidates)
    out = []
    for k in kappas:
        if not k > 0:
            raise ValueError(f"condition numbers must be positive, got {k!r}")
        if math.isinf(k):
            out.append(cs[-1])
        else:
            out.append(snap_to_candidates(math.ceil(math.log2(k) + b_base - 1e-12), cs))
    return out


@dataclass(frozen=True)
class RuleFit:
    """The spectral rule fitted to a budget."""

    bits: tuple[int, ...]  # width per layer
    b_base: float  # the largest offset β that fits
    total_bits: float  # Σ_l M_l·s(b_l), s(b) the stored bits per weight (b unless given)
    capacity: float  # B·Σ M_l


def fit_spectral_rule(kappas: Sequence[float], params: Sequence[int], avg_bits: float,
                      candidates: Sequence[int] = DEFAULT_CANDIDATES,
                      fixed: Mapping[int, int] | None = None,
                      storage: Mapping[int, Fraction] | None = None) -> RuleFit:
    """The rule b_l = snap(⌈log₂ κ_l + β⌉) with the largest β whose allocation fits the budget.

    Widths are non-decreasing in β and change only where log₂ κ_l + β crosses an integer, so
    the largest feasible β is one of those finitely many points (⌈·⌉ keeps the lower width at
    the crossing itself).  ``fixed`` = {layer index: bits} holds layers out of the rule;
    ``storage`` = {width: stored bits per weight} counts packed widths at their true size.
    """
    cs = check_candidates(candidates)
    if len(kappas) != len(params):
        raise ValueError(f"{len(kappas)} condition numbers for {len(params)} layers")
    fixed = dict(fixed or {})
    den, units = storage_units(storage)
    cap = budget_capacity([int(m) * den for m in params], avg_bits)
    free = [i for i in range(len(kappas)) if i not in fixed]

    def total(beta: float) -> tuple[list[int], int]:
        bits = [0] * len(kappas)
        rule = spectral_rule_bits([kappas[i] for i in free], beta, cs)
        for i, b in zip(free, rule):
            bits[i] = b
        for i, b in fixed.items():
            bits[i] = b
        return bits, sum(int(m) * units(b) for m, b in zip(params, bits))

    points = set()
    for i in free:
        k = kappas[i]
        if math.isfinite(k) and k > 0:
            for target in range(cs[0] - 1, cs[-1] + 1):
                points.add(target - math.log2(k))
    if not points:
        points.add(0.0)
    for beta in sorted(points, reverse=True):
        bits, t = total(beta)
        if t <= cap:
            return RuleFit(tuple(bits), beta, t / den, cap / den)
    bits, t = total(min(points) - 1.0)  # every finite-κ layer at the smallest candidate
    if t <= cap:  # pragma: no cover - the smallest point already gives this allocation
        return RuleFit(tuple(bits), min(points) - 1.0, t / den, cap / den)
    total_w = sum(int(m) for m in params)
    raise ValueError(
        f"infeasible budget: {float(avg_bits):g} average bits is below the spectral rule's smallest "
        f"allocation ({t / den / total_w:.4f} bits per weight: singular layers and protected layers are held high)"
    )


def spectral_costs(kappas: Sequence[float], params: Sequence[int],
                   candidates: Sequence[int] = DEFAULT_CANDIDATES) -> list[dict[int, float]]:
    """The note's error model as knapsack costs: c_l(b) = M_l·(κ_l·2^(−b))².

    A layer with κ = ∞ gets cost ∞ below the largest candidate (it is held there).
    """
    cs = check_candidates(candidates)
    out = []
    for k, m in zip(kappas, params):
        if math.isinf(k):
            out.append({b: (0.0 if b == cs[-1] else math.inf) for b in cs})
        else:
            out.append({b: float(m) * (k * 2.0 ** (-b)) ** 2 for b in cs})
    return out


def protected_indices(n_layers: int, protect_first_last: bool) -> list[int]:
    """Indices held at the protection width: the first and the last layer (forward order)."""
    if not protect_first_last or n_layers == 0:
        return []
    return sorted({0, n_layers - 1})
