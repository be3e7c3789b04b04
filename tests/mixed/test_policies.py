import math

import pytest
import torch
from torch import nn

from specquant.algorithms import ModuleSettings, RTNConfig
from specquant.core import spectral
from specquant.engine.apply import quantize
from specquant.mixed import allocate, fit_spectral_rule, lock_bits, spectral_costs, spectral_rule_bits
from specquant.mixed.policies import protected_indices, snap_to_candidates
from specquant.mixed.solver import budget_capacity, solve_bits


def with_kappa(out, inp, kappa, scale=1.0, seed=0):
    """A matrix with singular values geometrically spaced from scale down to scale/kappa."""
    g = torch.Generator().manual_seed(seed)
    r = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64))
    s = scale * torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)
    return (u * s) @ v.T


def test_lock_bits_and_snapping():
    assert [lock_bits(k) for k in (0.5, 1.0, 2.0, 3.0, 1024.0, 1025.0)] == [0, 0, 1, 2, 10, 11]
    assert lock_bits(math.inf) is None
    cands = (2, 3, 4, 6, 8)
    assert [snap_to_candidates(b, cands) for b in (0, 2, 2.5, 5, 7, 8, 12)] == [2, 2, 3, 6, 8, 8, 8]


@pytest.mark.parametrize("kappa", [2.0, 6.0, 40.0, 1000.0])
def test_spectral_rule_on_matrices_with_known_condition_number(kappa):
    w = with_kappa(24, 40, kappa)
    k = spectral.condition_number(w)
    assert k == pytest.approx(kappa, rel=1e-9)
    lock = math.ceil(math.log2(kappa))
    assert lock_bits(k) == lock
    for b_base in (-3, 0, 1):
        want = snap_to_candidates(lock + b_base, (1, 2, 3, 4, 5, 6, 7, 8))
        assert spectral_rule_bits([k], b_base, range(1, 9)) == [want]


def test_spectral_rule_singular_layer_gets_the_largest_width():
    assert spectral_rule_bits([math.inf, 4.0], 0, (2, 4, 6)) == [6, 2]


def test_fit_spectral_rule_uses_the_largest_offset_that_fits():
    kappas = [3.0, 40.0, 700.0, 9.0]
    params = [100, 300, 50, 200]
    cands = (2, 3, 4, 6, 8)
    for avg in (2.0, 2.5, 3.0, 4.0, 8.0):
        fit = fit_spectral_rule(kappas, params, avg, cands)
        cap = budget_capacity(params, avg)
        assert fit.total_bits <= cap
        assert list(fit.bits) == spectral_rule_bits(kappas, fit.b_base, cands)
        bigger = spectral_rule_bits(kappas, fit.b_base + 1e-6, cands)
        if bigger != list(fit.bits):  # the next step of the rule no longer fits
            assert sum(m * b for m, b in zip(params, bigger)) > cap
    # an integer offset is the note's rule ⌈log₂ κ⌉ + b_base
    assert spectral_rule_bits(kappas, -1, range(1, 9)) == [1, 5, 8, 3]
    with pytest.raises(ValueError, match="infeasible"):
        fit_spectral_rule(kappas, params, 1.5, cands)


def test_spectral_knapsack_recovers_the_continuous_rule():
    # minimising Σ M κ² 4^-b under the budget gives b_l = log₂ κ_l + const
    kappas, params = [2.0, 8.0, 32.0], [50, 50, 50]
    ch = solve_bits(spectral_costs(kappas, params, range(1, 9)), params, 4.0)
    assert ch.bits == (2, 4, 6)
    costs = spectral_costs([math.inf], [10], (2, 4))
    assert costs[0][2] == math.inf and costs[0][4] == 0.0


def test_protected_indices():
    assert protected_indices(5, True) == [0, 4]
    assert protected_indices(1, True) == [0]
    assert protected_indices(5, False) == []


def chain(kappas, sizes, seed=0):
    layers = []
    for i, k in enumerate(kappas):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(with_kappa(sizes[i + 1], sizes[i], k, seed=seed + i).float())
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def test_allocate_spectral_orders_widths_by_kappa_and_plugs_into_the_engine():
    # equal layer sizes: then an exchange argument makes the knapsack's optimum monotone in κ too
    model = chain([2.0, 300.0, 20.0, 3.0], [32, 32, 32, 32, 32])
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for policy in ("spectral", "spectral-knapsack"):
        alloc = allocate(model, x, 4.0, policy)
        kap = [a.kappa for a in alloc.layers]
        bits = [a.bits for a in alloc.layers]
        assert kap == pytest.approx([2.0, 300.0, 20.0, 3.0], rel=1e-4)
        order = sorted(range(4), key=lambda i: kap[i])
        assert [bits[i] for i in order] == sorted(bits)  # more bits for larger κ
        assert alloc.avg_bits <= 4.0
        cfg = alloc.apply(RTNConfig(bits=8))
        assert cfg.modules == {a.name: ModuleSettings(bits=a.bits) for a in alloc.layers}
        report = quantize(model_copy(model), cfg, x, progress=False)
        assert [(r.name, r.bits) for r in report.layers] == [(a.name, a.bits) for a in alloc.layers]
        assert report.avg_bits == pytest.approx(alloc.avg_bits)


def test_apply_replaces_the_configs_widths_and_keeps_its_other_settings():
    model = chain([2.0, 300.0, 20.0, 3.0], [32, 32, 32, 32, 32])
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    cfg0 = RTNConfig(bits=8, modules={"0": ModuleSettings(skip=True), "4": ModuleSettings(bits=5),
                                      "*": ModuleSettings(bits=3, granularity="tensor")})
    alloc = allocate(model, x, 4.0, "spectral", method_config=cfg0)
    assert [a.name for a in alloc.layers] == ["2", "4", "6"]  # the skipped layer is not allocated
    cfg = alloc.apply(cfg0)
    assert cfg.modules["0"] == ModuleSettings(skip=True) and cfg.modules["*"] == ModuleSettings(granularity="tensor")
    for a in alloc.layers:  # exact entries: each allocated width, and the granularity its entry gave
        s = cfg.settings_for(a.name)
        assert (s.bits, s.skip, s.row_bits) == (a.bits, False, None)
        assert s.granularity.kind == ("channel" if a.name == "4" else "tensor")
    report = quantize(model_copy(model), cfg, x, progress=False)
    assert [(r.name, r.bits) for r in report.layers] == [(a.name, a.bits) for a in alloc.layers]


def test_allocate_protection_holds_first_and_last_layers():
    model = chain([2.0, 300.0, 20.0, 3.0], [16, 32, 32, 32, 8])
    alloc = allocate(model, None, 4.0, "spectral-knapsack", protect_first_last=True, protect_bits=8,
                     example_input=torch.randn(4, 16))
    assert alloc.layers[0].bits == 8 and alloc.layers[-1].bits == 8
    assert alloc.layers[0].protected and not alloc.layers[1].protected
    assert alloc.avg_bits <= 4.0
    with pytest.raises(ValueError, match="unknown allocation policy"):
        allocate(model, None, 4.0, "greedy")
    with pytest.raises(ValueError, match="needs calibration data"):
        allocate(model, None, 4.0, "sensitivity")


def model_copy(m):
    import copy

    return copy.deepcopy(m)


def test_allocation_to_dict_is_strict_json_with_a_singular_layer():
    import json

    model = chain([2.0, 300.0], [8, 8, 8])
    with torch.no_grad():
        model[2].weight[0].zero_()  # singular: κ = inf, held at the largest width
    alloc = allocate(model, None, 5.0, "spectral", example_input=torch.randn(2, 8))
    assert math.isinf(alloc.layers[1].kappa) and alloc.layers[1].bits == 8
    d = json.loads(json.dumps(alloc.to_dict(), allow_nan=False))
    assert d["layers"][1]["kappa"] is None and d["overrides"] == {a.name: a.bits for a in alloc.layers}
