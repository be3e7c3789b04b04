import itertools
import math
import random

import pytest

from specquant.mixed.solver import budget_capacity, solve_bits, solve_mckp


def brute_force(costs, weights, capacity):
    best = math.inf
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        w = sum(weights[i][k] for i, k in enumerate(choice))
        c = sum(costs[i][k] for i, k in enumerate(choice))
        if w <= capacity and c < best:
            best = c
    return best


def random_case(rng):
    n = rng.randint(1, 5)
    scale = rng.choice([1, 7, 1000])  # a common factor exercises the gcd scaling
    costs, weights = [], []
    for _ in range(n):
        k = rng.randint(1, 4)
        costs.append([rng.uniform(0, 10) if rng.random() > 0.1 else math.inf for _ in range(k)])
        weights.append([scale * rng.randint(0, 20) for _ in range(k)])
        if all(math.isinf(c) for c in costs[-1]):
            costs[-1][0] = rng.uniform(0, 10)
    lo = sum(min(w for w, c in zip(ws, cs) if c < math.inf) for ws, cs in zip(weights, costs))
    hi = sum(max(ws) for ws in weights)
    capacity = rng.randint(lo, max(lo, hi)) + rng.randint(0, scale - 1)  # capacity off the gcd grid
    return costs, weights, capacity


@pytest.mark.parametrize("solver", ["dp", "milp"])
def test_optimal_against_brute_force_on_random_small_cases(solver):
    rng = random.Random(1234)
    for _ in range(150 if solver == "dp" else 40):
        costs, weights, capacity = random_case(rng)
        sol = solve_mckp(costs, weights, capacity, solver=solver)
        best = brute_force(costs, weights, capacity)
        assert sol.cost == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert sol.weight <= capacity
        assert sol.weight == sum(weights[i][k] for i, k in enumerate(sol.choice))
        assert sol.cost == pytest.approx(sum(costs[i][k] for i, k in enumerate(sol.choice)))
        assert all(costs[i][k] < math.inf for i, k in enumerate(sol.choice))


def test_budget_respected_exactly_and_used_when_more_bits_always_help():
    params = [432, 2304, 9216, 36864, 640]
    costs = [{b: m * 4.0 ** -b for b in (2, 3, 4, 6, 8)} for m in params]
    for avg in (2.0, 2.25, 2.5, 3.0, 3.7, 8.0):
        ch = solve_bits(costs, params, avg)
        cap = budget_capacity(params, avg)
        assert ch.total_bits == sum(m * b for m, b in zip(params, ch.bits))
        assert ch.total_bits <= cap
        assert ch.avg_bits <= avg + 1e-12
    # a budget that is exactly attainable is used to the last bit
    ch = solve_bits([{2: 1.0, 3: 0.5}, {2: 1.0, 3: 0.2}], [10, 10], 2.5)
    assert ch.bits == (2, 3) and ch.total_bits == 50 == ch.capacity


def test_budget_capacity_is_exact_decimal_arithmetic():
    assert math.floor(2.3 * 100) == 229  # the float product falls short of 230
    assert budget_capacity([100], 2.3) == 230
    assert budget_capacity([3, 4], 2.5) == 17
    with pytest.raises(ValueError):
        budget_capacity([10], 0)
    with pytest.raises(ValueError):
        budget_capacity([10], math.inf)


def test_infeasible_budget_raises_a_clear_error():
    with pytest.raises(ValueError, match="infeasible budget.*below the smallest allocation"):
        solve_bits([{2: 1.0, 4: 0.1}, {2: 1.0, 4: 0.1}], [100, 100], 1.5)
    with pytest.raises(ValueError, match="infeasible"):
        solve_mckp([[1.0], [2.0]], [[5], [6]], 10)
    with pytest.raises(ValueError, match="infinite cost"):
        solve_mckp([[math.inf]], [[1]], 10)


def test_fixed_layers_and_ties_prefer_the_lighter_choice():
    ch = solve_bits([{2: 1.0, 8: 1.0}, {2: 5.0, 8: 0.0}], [10, 10], 8.0, fixed={1: 6})
    assert ch.bits == (2, 6)  # tie in cost at layer 0: the lighter width
    assert ch.cost == 1.0
    with pytest.raises(ValueError, match="out of range"):
        solve_bits([{2: 1.0}], [10], 4, fixed={3: 4})


def test_auto_matches_dp_and_bad_inputs_are_rejected():
    costs, weights = [[3.0, 1.0], [2.0, 0.5]], [[2, 4], [3, 6]]
    assert solve_mckp(costs, weights, 8, "auto").cost == solve_mckp(costs, weights, 8, "dp").cost == 3.0
    with pytest.raises(ValueError, match="unknown solver"):
        solve_mckp(costs, weights, 8, "greedy")
    with pytest.raises(ValueError, match="non-negative integer"):
        solve_mckp([[1.0]], [[-1]], 8)
    with pytest.raises(ValueError, match="as many costs"):
        solve_mckp([[1.0, 2.0]], [[1]], 8)


@pytest.mark.parametrize("solver", ["dp", "milp"])
def test_solve_bits_with_packed_storage_is_optimal_against_brute_force(solver):
    # stored bits per weight s(b): 3-level codes at 8/5 bits; the budget Σ M·s(b) ≤ B·Σ M is exact
    from fractions import Fraction

    storage = {2: Fraction(8, 5), 3: Fraction(3), 4: Fraction(4), 6: Fraction(6)}
    rng = random.Random(7)
    for _ in range(40):
        n = rng.randint(1, 4)
        params = [rng.choice([5, 9, 27, 64]) for _ in range(n)]
        widths = sorted(rng.sample([2, 3, 4, 6], rng.randint(1, 4)))
        costs = [{b: rng.uniform(0, 10) * 2.0 ** -b for b in widths} for _ in range(n)]
        lo = sum(m * storage[widths[0]] for m in params) / sum(params)
        budget = round(rng.uniform(float(lo), 6.5), 2)
        if budget < lo:
            continue
        got = solve_bits(costs, params, budget, solver=solver, storage=storage)
        best, best_w = math.inf, None
        for choice in itertools.product(widths, repeat=n):
            w = sum(m * storage[b] for m, b in zip(params, choice))
            c = sum(costs[i][b] for i, b in enumerate(choice))
            if w <= Fraction(repr(budget)) * sum(params) and c < best:
                best, best_w = c, w
        assert got.cost == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert got.total_bits == pytest.approx(float(sum(m * storage[b] for m, b in zip(params, got.bits))))
        assert got.avg_bits <= budget + 1e-12 and best_w is not None


def test_packed_two_bit_storage_fits_more_in_the_same_budget():
    # two equal layers at 2.5 average bits: 2+3 bits without packing, 1.6+3 (or better) with it
    from fractions import Fraction

    costs = [{2: 10.0, 3: 1.0, 4: 0.1}, {2: 10.0, 3: 1.0, 4: 0.1}]
    plain = solve_bits(costs, [100, 100], 2.5)
    packed = solve_bits(costs, [100, 100], 2.8, storage={2: Fraction(8, 5)})
    assert sorted(plain.bits) == [2, 3] and plain.avg_bits == 2.5
    assert sorted(packed.bits) == [2, 4] and packed.avg_bits == pytest.approx(2.8)
