"""Rounding: nearest (ties to even) and unbiased, seeded stochastic rounding."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.grid import GridSpec, fake_quantize
from specquant.core.quantizer import quantize_tensor
from specquant.core.rounding import ROUNDING_MODES, make_generator, round_values

N = 200_000


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=64))
def test_nearest_error_at_most_half(vals):
    t = torch.tensor(vals, dtype=torch.float64)
    r = round_values(t, "nearest")
    assert torch.equal(r, r.round())
    assert float((r - t).abs().max()) <= 0.5


def test_nearest_ties_to_even():
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert round_values(t, "nearest").tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=64), st.integers(0, 2**31 - 1))
def test_stochastic_rounds_to_floor_or_ceil(vals, seed):
    t = torch.tensor(vals, dtype=torch.float64)
    r = round_values(t, "stochastic", make_generator(seed))
    assert bool(((r == torch.floor(t)) | (r == torch.ceil(t))).all())


@pytest.mark.parametrize("frac", [0.1, 0.3, 0.5, 0.9])
def test_stochastic_is_unbiased_at_a_fixed_point(frac):
    """E[round(t)] = t and Var = f(1 − f) for t = k + f (Bernoulli(f) on top of the floor)."""
    t = torch.full((N,), 3.0 + frac, dtype=torch.float64)
    r = round_values(t, "stochastic", make_generator(7))
    err = r - t
    assert abs(float(err.mean())) < 3 * math.sqrt(frac * (1 - frac)) / math.sqrt(N)
    assert float(err.var()) == pytest.approx(frac * (1 - frac), rel=0.05)


@pytest.mark.parametrize("kind", ["narrow", "full", "midrise", "asymmetric"])
def test_stochastic_quantization_error_is_unbiased_with_variance_at_most_quarter_step(kind):
    """Mean error → 0 (|mean| < 3·std/√n) and Var(error) ≤ Δ²/4 on a real grid."""
    spec = GridSpec(3, kind)
    delta = 0.25
    if kind == "asymmetric":
        scale, zp = torch.tensor(delta), torch.tensor(3.0)
    else:
        scale, zp = spec.qparams_from_alpha(torch.tensor(delta * spec.alpha_steps))
    assert float(scale) == pytest.approx(delta)
    lo, hi = spec.value_range(scale, zp)  # stay inside the grid: no clamping bias
    g = torch.Generator().manual_seed(3)
    x = (lo + (hi - lo) * torch.rand(N, generator=g, dtype=torch.float64)).float()
    err = (fake_quantize(x, scale, zp, spec, "stochastic", make_generator(11)) - x).double()
    n = err.numel()
    assert abs(float(err.mean())) < 3 * float(err.std()) / math.sqrt(n)
    assert float(err.var()) <= delta**2 / 4
    assert float(err.abs().max()) <= delta * (1 + 1e-6)  # never more than one step away
    # nearest rounding for comparison: error ≤ Δ/2 and variance ≈ Δ²/12
    err_n = (fake_quantize(x, scale, zp, spec) - x).double()
    assert float(err_n.abs().max()) <= delta / 2 * (1 + 1e-6)
    assert float(err_n.var()) == pytest.approx(delta**2 / 12, rel=0.03)


def test_stochastic_quantize_tensor_is_seeded():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    a = quantize_tensor(w, bits=3, rounding="stochastic", seed=5)
    b = quantize_tensor(w, bits=3, rounding="stochastic", seed=5)
    c = quantize_tensor(w, bits=3, rounding="stochastic", seed=6)
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)
    # the seed changes only the rounding, never the grid
    assert torch.equal(a.scale, c.scale) and torch.equal(a.zero_point, c.zero_point)
    # and stochastic codes differ from nearest ones by at most one step
    n = quantize_tensor(w, bits=3, rounding="nearest")
    assert int((a.codes.int() - n.codes.int()).abs().max()) <= 1


def test_make_generator_default_is_reproducible():
    a = torch.rand(5, generator=make_generator(None))
    b = torch.rand(5, generator=make_generator(0))
    assert torch.equal(a, b)


def test_unknown_rounding_lists_modes():
    with pytest.raises(ValueError, match="allowed: nearest, stochastic"):
        round_values(torch.zeros(2), "floor")
    with pytest.raises(ValueError, match="allowed: nearest, stochastic"):
        quantize_tensor(torch.ones(2, 2), rounding="floor")
    assert ROUNDING_MODES == ("nearest", "stochastic")
