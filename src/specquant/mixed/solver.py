"""Exact bit allocation under an average-bits budget: a multiple-choice knapsack.

Problem.  Layer l (an *item*) gets exactly one width b from its candidates (an *option*), at a
cost c_l(b) (a predicted error) and a storage weight M_l·b (M_l weights of b bits each):

    minimise   Σ_l c_l(b_l)
    subject to Σ_l M_l·b_l ≤ B·Σ_l M_l            (B = average bits per weight)

Solvers (both exact, neither greedy):

``"dp"``  dynamic programming over the budget in *exact integer units*.  Storage weights are
    integers (weights × bits), so after subtracting each item's lightest option and dividing
    every weight and the capacity by the greatest common divisor g of the remaining weights,
    Σ w ≤ C  ⟺  Σ w/g ≤ ⌊C/g⌋ holds exactly: nothing is rounded.  Time O(Σ_l K_l · C/g),
    memory O(L · C/g) bytes for the back-pointers.  Ties in cost go to the lighter allocation.
``"milp"`` SciPy's ``milp`` (HiGHS branch and bound) with binary x_lk, Σ_k x_lk = 1 per item and
    the budget row; the relative gap is set to 0.  Exact up to HiGHS's feasibility tolerances;
    meant for budgets whose integer grid is too fine for the DP.
``"auto"`` the DP when its table has at most ``DP_MAX_CELLS`` cells, else the MILP.

An option with an infinite cost is forbidden (how a layer is held at a fixed width).
A budget below the lightest possible allocation raises a ValueError that says what the minimum is.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

SOLVERS = ("auto", "dp", "milp")
DP_MAX_CELLS = 20_000_000  # items × (capacity cells): above this "auto" uses the MILP


@dataclass(frozen=True)
class KnapsackSolution:
    """The optimal choice of one option per item."""

    choice: tuple[int, ...]  # index of the chosen option of each item
    cost: float  # Σ of the chosen costs (the minimum)
    weight: int  # Σ of the chosen weights (≤ capacity)
    capacity: int  # the capacity it was solved for
    solver: str  # "dp" or "milp"


def _check_problem(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], capacity: int):
    if len(costs) != len(weights):
        raise ValueError(f"costs has {len(costs)} items but weights has {len(weights)}")
    if len(costs) == 0:
        raise ValueError("the knapsack needs at least one item")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise ValueError(f"capacity must be an integer, got {capacity!r}")
    items = []
    for i, (cs, ws) in enumerate(zip(costs, weights)):
        if len(cs) != len(ws) or len(cs) == 0:
            raise ValueError(f"item {i}: needs as many costs as weights (>= 1), got {len(cs)} and {len(ws)}")
        opts = []
        for k, (c, w) in enumerate(zip(cs, ws)):
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
                raise ValueError(f"item {i} option {k}: weight must be a non-negative integer, got {w!r}")
            c = float(c)
            if math.isnan(c) or c == -math.inf:
                raise ValueError(f"item {i} option {k}: cost must be a number or +inf, got {c!r}")
            if c < math.inf:
                opts.append((k, int(w), c))
        if not opts:
            raise ValueError(f"item {i}: every option has an infinite cost (nothing allowed)")
        items.append(opts)
    return items


def _infeasible(items, capacity: int) -> ValueError:
    lightest = sum(min(w for _, w, _ in opts) for opts in items)
    return ValueError(f"infeasible budget: capacity {capacity} is below the lightest allowed choice ({lightest})")


def solve_mckp(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], capacity: int,
               solver: str = "auto") -> KnapsackSolution:
    """Minimise Σ costs[i][k_i] subject to Σ weights[i][k_i] ≤ capacity, one option k_i per item."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    items = _check_problem(costs, weights, capacity)
    capacity = int(capacity)
    base = sum(min(w for _, w, _ in opts) for opts in items)
    if base > capacity:
        raise _infeasible(items, capacity)
    if solver == "auto":
        solver = "dp" if len(items) * (_dp_cells(items, capacity) + 1) <= DP_MAX_CELLS else "milp"
    sol = _solve_dp(items, capacity) if solver == "dp" else _solve_milp(items, capacity)
    return sol


def _reduced(items, capacity: int):
    """Weights minus each item's lightest, divided by their gcd; the capacity likewise (exact)."""
    mins = [min(w for _, w, _ in opts) for opts in items]
    g = 0
    for opts, m in zip(items, mins):
        for _, w, _ in opts:
            g = math.gcd(g, w - m)
    g = g or 1
    cap = (capacity - sum(mins)) // g
    top = sum(max(w - m for _, w, _ in opts) // g for opts, m in zip(items, mins))
    return mins, g, min(cap, top)


def _dp_cells(items, capacity: int) -> int:
    return _reduced(items, capacity)[2]


def _solve_dp(items, capacity: int) -> KnapsackSolution:
    mins, g, cap = _reduced(items, capacity)
    n_cells = cap + 1
    dp = np.full(n_cells, np.inf)
    dp[0] = 0.0  # dp[c]: least cost of the items so far with reduced weight exactly c
    back = []
    for opts, m in zip(items, mins):
        # lighter options first, so that a tie in cost keeps the lighter one (strict <)
        order = sorted(opts, key=lambda o: (o[1], o[0]))
        new = np.full(n_cells, np.inf)
        arg = np.full(n_cells, -1, dtype=np.int16 if len(opts) < 2**15 else np.int64)
        for k, w, c in order:
            s = (w - m) // g
            if s >= n_cells:
                continue
            cand = np.full(n_cells, np.inf)
            cand[s:] = dp[: n_cells - s] + c
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        back.append(arg)
    if not np.isfinite(dp).any():  # pragma: no cover - excluded by the feasibility check
        raise _infeasible(items, capacity)
    best = float(dp.min())
    cell = int(np.flatnonzero(dp == best)[0])  # the lightest allocation of least cost
    choice = []
    for opts, m, arg in zip(reversed(items), reversed(mins), reversed(back)):
        k = int(arg[cell])
        w = next(w for kk, w, _ in opts if kk == k)
        choice.append(k)
        cell -= (w - m) // g
    choice.reverse()
    return _solution(items, choice, capacity, "dp")


def _solution(items, choice, capacity: int, solver: str) -> KnapsackSolution:
    cost = weight = 0
    for opts, k in zip(items, choice):
        _, w, c = next(o for o in opts if o[0] == k)
        cost += c
        weight += w
    return KnapsackSolution(tuple(choice), float(cost), int(weight), capacity, solver)


def _solve_milp(items, capacity: int) -> KnapsackSolution:
    flat = [(i, k, w, c) for i, opts in enumerate(items) for k, w, c in opts]
    n = len(flat)
    c = np.array([f[3] for f in flat])
    shift = min(c)  # costs are only compared within an item: shift for a better-scaled objective
    A = lil_matrix((len(items) + 1, n))
    for j, (i, _k, w, _c) in enumerate(flat):
        A[i, j] = 1.0
        A[len(items), j] = float(w)
    lo = np.concatenate([np.ones(len(items)), [-np.inf]])
    hi = np.concatenate([np.ones(len(items)), [float(capacity)]])
    res = milp(c - shift, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise ValueError(f"the MILP solver found no allocation: {res.message}")
    x = np.round(res.x).astype(int)
    choice = [-1] * len(items)
    for j, (i, k, _w, _c) in enumerate(flat):
        if x[j] == 1:
            choice[i] = k
    if -1 in choice:  # pragma: no cover - HiGHS returned a fractional point
        raise ValueError("the MILP solver returned an invalid allocation")
    sol = _solution(items, choice, capacity, "milp")
    if sol.weight > capacity:  # pragma: no cover
        raise ValueError("the MILP solver returned an allocation over the budget")
    return sol


# --------------------------------------------------------------------------- bits under a budget


def budget_capacity(params: Sequence[int], avg_bits: float) -> int:
    """⌊B·Σ M_l⌋ in exact arithmetic (B read as the decimal it prints as: 2.3 is 23/10)."""
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float, Fraction)) or not avg_bits > 0:
        raise ValueError(f"the average-bits budget must be a positive number, got {avg_bits!r}")
    if not math.isfinite(float(avg_bits)):
        raise ValueError(f"the average-bits budget must be finite, got {avg_bits!r}")
    b = avg_bits if isinstance(avg_bits, Fraction) else Fraction(repr(float(avg_bits)))
    total = sum(int(m) for m in params)
    return math.floor(b * total)


def storage_units(storage: Mapping[int, Fraction] | None):
    """(D, units): D the lcm of the stored widths' denominators and units(b) = s(b)·D, an integer
    (s(b) = ``storage[b]``, or b when not listed), so budgets in 1/D bit stay exact integers."""
    store = {b: Fraction(v) for b, v in (storage or {}).items()}
    scale = 1
    for v in store.values():
        if not v > 0:
            raise ValueError(f"stored bits per weight must be positive, got {v}")
        scale = math.lcm(scale, v.denominator)

    def units(b: int) -> int:  # stored bits of one weight of width b, in 1/scale bit
        return int(store.get(b, Fraction(b)) * scale)

    return scale, units


@dataclass(frozen=True)
class BitChoice:
    """Bits per layer from :func:`solve_bits`."""

    bits: tuple[int, ...]  # chosen width of each layer
    cost: float  # Σ_l cost_l(b_l)
    total_bits: float  # Σ_l M_l·s(b_l), s(b) the stored bits per weight of width b (b by default)
    capacity: float  # B·Σ M_l (exact in units of 1/D bit, D the storage denominators' lcm)
    avg_bits: float  # total_bits / Σ M_l
    solver: str


def solve_bits(costs: Sequence[Mapping[int, float]], params: Sequence[int], avg_bits: float,
               fixed: Mapping[int, int] | None = None, solver: str = "auto",
               storage: Mapping[int, Fraction] | None = None) -> BitChoice:
    """Widths b_l minimising Σ_l costs[l][b_l] subject to Σ_l M_l·s(b_l) ≤ avg_bits·Σ_l M_l.

    Args:
        costs: per layer, {bits: predicted cost}; its keys are the candidate widths of the layer.
        params: M_l, the number of weights of each layer.
        avg_bits: the budget B in average bits per weight.
        fixed: {layer index: bits} held at that width (counted in the budget; the width need not
            be among the layer's candidates; its cost is taken as 0 when not given).
        storage: {width: stored bits per weight s(b)} as exact fractions (e.g. 8/5 for 3-level
            codes packed five per byte); widths not listed store b bits.  Every storage weight
            and the capacity are scaled by the lcm D of the denominators, so the integer
            knapsack stays exact.
    """
    if len(costs) != len(params):
        raise ValueError(f"{len(costs)} cost tables for {len(params)} layers")
    fixed = dict(fixed or {})
    for i, b in fixed.items():
        if not 0 <= i < len(params):
            raise ValueError(f"fixed layer index {i} out of range 0..{len(params) - 1}")
        _check_width(b)
    scale, units = storage_units(storage)
    cap = budget_capacity([int(m) * scale for m in params], avg_bits) if params else 0
    total = sum(int(m) for m in params)
    opt_bits, opt_costs, opt_weights = [], [], []
    for i, (table, m) in enumerate(zip(costs, params)):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"layer {i}: the number of weights must be a positive integer, got {m!r}")
        if i in fixed:
            bs = [fixed[i]]
            cs = [float(table.get(fixed[i], 0.0))]
        else:
            if not table:
                raise ValueError(f"layer {i}: no candidate widths")
            bs = sorted(table)
            for b in bs:
                _check_width(b)
            cs = [float(table[b]) for b in bs]
        opt_bits.append(bs)
        opt_costs.append(cs)
        opt_weights.append([int(m) * units(b) for b in bs])
    try:
        sol = solve_mckp(opt_costs, opt_weights, cap, solver)
    except ValueError as e:
        if not str(e).startswith("infeasible"):
            raise
        lightest = sum(min(w for w, c in zip(ws, cs) if c < math.inf) for ws, cs in zip(opt_weights, opt_costs))
        raise ValueError(
            f"infeasible budget: {float(avg_bits):g} average bits is below the smallest allocation the "
            f"candidates allow ({lightest / scale / total:.4f} bits per weight)"
        ) from None
    bits = tuple(bs[k] for bs, k in zip(opt_bits, sol.choice))
    return BitChoice(bits=bits, cost=sol.cost, total_bits=sol.weight / scale, capacity=cap / scale,
                     avg_bits=sol.weight / scale / total, solver=sol.solver)


def _check_width(b) -> None:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 8:
        raise ValueError(f"bit widths must be integers in 1..8, got {b!r}")
