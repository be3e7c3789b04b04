"""Uniform grids: shapes, coverage, zero-range blocks, granularity, input checks."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specquant.core.grid import (
    GRID_KINDS,
    Granularity,
    GridSpec,
    check_bits,
    check_finite,
    dequantize_codes,
    fake_quantize,
    quantize_codes,
)
from specquant.core.metrics import sqnr

DB_PER_BIT = 20 * math.log10(2)  # 6.0206 dB: halving Δ quarters the MSE


def all_specs():
    """Every uniform (bits, kind) the core accepts (the FP8 float grids have their own tests below)."""
    specs = []
    for kind in (k for k in GRID_KINDS if not k.startswith("fp8")):
        for bits in range(1, 9):
            try:
                specs.append(GridSpec(bits, kind))
            except ValueError:
                pass
    return specs


def grid_values(spec: GridSpec, scale: float = 1.0, zp: float | None = None) -> torch.Tensor:
    """All values the grid represents, ascending."""
    zp = spec.symmetric_zero_point if zp is None else zp
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float64)
    f64 = torch.float64
    return dequantize_codes(codes, torch.tensor(scale, dtype=f64), torch.tensor(zp, dtype=f64))


# --------------------------------------------------------------------------- theory: uniform data

def uniform_data(n: int = 200_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).float()


def midrise_on_unit_interval(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """Quantize x ∈ [−1, 1] on the b-bit mid-rise grid whose 2^b cells tile [−1, 1] exactly.

    With Δ = 2/2^b the levels ±Δ/2, …, ±(1 − Δ/2) are the centres of the cells
    [−1 + kΔ, −1 + (k+1)Δ]; every value is rounded to the centre of its own cell, so the error
    is uniform on [−Δ/2, Δ/2]: MSE = Δ²/12 and SQNR = 10·log10((1/3)/(Δ²/12)) = 6.02·b dB.
    """
    spec = GridSpec(bits, "midrise")
    delta = 2.0 / 2**bits
    scale, zp = spec.qparams_from_alpha(torch.tensor(1.0 - delta / 2))
    assert math.isclose(float(scale), delta, rel_tol=1e-6)
    return fake_quantize(x, scale, zp, spec), delta


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_data_mse_is_delta_squared_over_12(bits):
    x = uniform_data()
    xq, delta = midrise_on_unit_interval(x, bits)
    mse = float((xq.double() - x.double()).square().mean())
    assert mse == pytest.approx(delta**2 / 12, rel=0.02)
    assert float((xq - x).abs().max()) <= delta / 2 * (1 + 1e-5)


def test_uniform_data_sqnr_grows_6_02_db_per_bit():
    x = uniform_data()
    s = {b: sqnr(x, midrise_on_unit_interval(x, b)[0]) for b in range(4, 9)}
    for b in range(4, 8):
        assert s[b + 1] - s[b] == pytest.approx(DB_PER_BIT, abs=0.1)
    # and the absolute level is the theoretical 6.02·b dB
    for b in range(4, 9):
        assert s[b] == pytest.approx(DB_PER_BIT * b, abs=0.1)


# --------------------------------------------------------------------------- grid shapes

@pytest.mark.parametrize("bits", range(2, 9))
def test_shapes_match_their_docstring(bits):
    L = 2**bits
    narrow = grid_values(GridSpec(bits, "narrow"))
    assert torch.equal(narrow, torch.arange(-(L // 2 - 1), L // 2, dtype=torch.float64))  # 0, ±1, …
    full = grid_values(GridSpec(bits, "full"))
    assert torch.equal(full, torch.arange(-(L // 2), L // 2, dtype=torch.float64))
    midrise = grid_values(GridSpec(bits, "midrise"))
    assert torch.equal(midrise, torch.arange(-(L // 2), L // 2, dtype=torch.float64) + 0.5)
    for kind, vals in (("narrow", narrow), ("full", full), ("midrise", midrise)):
        assert GridSpec(bits, kind).levels == len(vals) == len(set(vals.tolist()))
    assert GridSpec(bits, "asymmetric").levels == L


def test_binary_and_ternary_grids():
    assert grid_values(GridSpec(1, "binary")).tolist() == [-0.5, 0.5]  # ±α with Δ = 2α
    assert GridSpec(1, "binary").levels == 2
    ternary = GridSpec.default(2)
    assert ternary.kind == "narrow" and ternary.levels == 3
    assert grid_values(ternary).tolist() == [-1.0, 0.0, 1.0]
    assert GridSpec.default(1).kind == "binary"
    assert GridSpec.default(4, symmetric=False).kind == "asymmetric"


@pytest.mark.parametrize("spec", [s for s in all_specs() if s.symmetric], ids=str)
def test_alpha_is_the_outermost_level(spec):
    alpha = torch.tensor(2.5, dtype=torch.float64)
    scale, zp = spec.qparams_from_alpha(alpha)
    vals = grid_values(spec, float(scale), float(zp))
    assert float(vals.abs().max()) == pytest.approx(2.5, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(all_specs()),
    lo=st.floats(-1e3, 0.0),
    hi=st.floats(0.0, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_rounding_error_within_half_a_step_on_the_covered_range(spec, lo, hi, seed):
    """qparams_from_range covers [lo, hi]: every value in it is within Δ/2 of a level."""
    if spec.kind == "full" and spec.bits == 1 and hi > 0:
        hi = 0.0  # the 1-bit full grid {−Δ, 0} has no positive level
    lo_t, hi_t = torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64)
    scale, zp = spec.qparams_from_range(lo_t, hi_t)
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(1, 257, generator=g, dtype=torch.float64)
    x[0, 0], x[0, -1] = lo, hi
    err = (fake_quantize(x, scale[:, None], zp[:, None], spec) - x).abs()
    assert float(err.max()) <= float(scale) / 2 * (1 + 1e-9) + 1e-12
    codes = quantize_codes(x, scale[:, None], zp[:, None], spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert torch.equal(codes, codes.round())


def test_full_grid_range_covers_positive_end():
    """A "full" grid set from [lo, hi] reaches hi with its (shorter) positive side."""
    spec = GridSpec(4, "full")
    scale, zp = spec.qparams_from_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    vmin, vmax = spec.value_range(scale, zp)
    assert float(vmax) == pytest.approx(1.0) and float(vmin) <= -1.0


@pytest.mark.parametrize("spec", all_specs(), ids=str)
def test_zero_range_block_has_zero_scale_and_dequantizes_to_zero(spec):
    zero = torch.zeros(1)
    scale, zp = spec.qparams_from_range(zero, zero)
    assert float(scale) == 0.0 and math.isfinite(float(zp))
    xq = fake_quantize(torch.zeros(1, 5), scale[:, None], zp[:, None], spec)
    assert torch.equal(xq, torch.zeros(1, 5))


def test_asymmetric_grid_contains_zero_and_a_constant():
    spec = GridSpec(3, "asymmetric")
    for c in (2.75, -0.3):
        lo, hi = torch.tensor([min(c, 0.0)]), torch.tensor([max(c, 0.0)])
        scale, zp = spec.qparams_from_range(lo, hi)
        assert float(zp) == round(float(zp)) and spec.qmin <= float(zp) <= spec.qmax
        x = torch.tensor([[c, 0.0]])
        torch.testing.assert_close(fake_quantize(x, scale[:, None], zp[:, None], spec), x, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- checks

@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True, "4", None])
def test_check_bits_rejects_with_range(bad):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        check_bits(bad)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        GridSpec(bad, "narrow")


@pytest.mark.parametrize("bits", range(1, 9))
def test_check_bits_accepts_1_to_8(bits):
    assert check_bits(bits) == bits


def test_gridspec_rejects_unknown_kind_and_bad_combinations():
    with pytest.raises(ValueError, match="allowed: narrow, full, midrise, binary, asymmetric"):
        GridSpec(4, "log")
    with pytest.raises(ValueError, match="bits >= 2"):
        GridSpec(1, "narrow")
    with pytest.raises(ValueError, match="1 bit"):
        GridSpec(2, "binary")


def test_check_finite_names_count_and_first_index():
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    x[2, 3] = float("-inf")
    msg = r"w has 3 non-finite value\(s\) \(1 NaN, 2 Inf\) of 12; first at index \(1, 2\)"
    with pytest.raises(ValueError, match=msg):
        check_finite(x, "w")
    check_finite(torch.ones(3), "w")  # finite: no error
    check_finite(torch.arange(3), "w")  # integers are always finite


# --------------------------------------------------------------------------- granularity

def test_granularity_parse_forms():
    assert Granularity.parse("tensor").kind == "tensor"
    assert Granularity.parse("channel", axis=1) == Granularity("channel", axis=1)
    g8 = Granularity("group", group_size=8)
    assert Granularity.parse(("group", 8)) == Granularity.parse("group:8") == g8
    g = Granularity("group", group_size=4)
    assert Granularity.parse(g) is g
    for bad in ("row", ("group", 0), ("group", 2.0), "group:x", ("group", True)):
        with pytest.raises(ValueError):
            Granularity.parse(bad)


def test_group_size_need_not_divide_input_dimension():
    """G = 5 on 12 inputs: groups of 5, 5 and 2; the blocked view is padded, the parts are not."""
    g = Granularity.parse(("group", 5))
    shape = (3, 4, 3)  # (out, in, k): N0 = 12
    assert (g.num_groups(shape), g.last_group_size(shape), g.is_ragged(shape)) == (3, 2, True)
    assert g.blocked_shape(shape) == (3, 3, 5) and g.scale_shape(shape) == (3, 3, 1)
    x = torch.arange(36.0).reshape(shape)
    xb = g.to_blocks(x, fill=-1.0)  # (3, 3, 5)
    assert xb.shape == (3, 3, 5) and xb[0, 2].tolist() == [10.0, 11.0, -1.0, -1.0, -1.0]
    assert torch.equal(g.from_blocks(xb, shape), x)
    full, last = g.row_parts(x)
    assert full.shape == (6, 5) and last.shape == (3, 2)
    assert last[1].tolist() == [22.0, 23.0] and full[2].tolist() == [12.0, 13.0, 14.0, 15.0, 16.0]
    per_block = g.scale_from_parts([full.amax(dim=1), last.amax(dim=1)], shape)  # (3, 3, 1)
    assert per_block[:, :, 0].tolist() == [[4.0, 9.0, 11.0], [16.0, 21.0, 23.0], [28.0, 33.0, 35.0]]
    assert g.per_entry(per_block, (3, 12))[0].tolist() == [4.0] * 5 + [9.0] * 5 + [11.0] * 2
    with pytest.raises(ValueError, match=r"group size 5 leaves a shorter last group .* \(use row_parts\)"):
        g.to_rows(x)
    g24 = Granularity.parse("group:24")  # larger than N0: one (short) group per row
    assert g24.scale_shape(shape) == (3, 1, 1) and [p.shape for p in g24.row_parts(x)] == [(3, 12)]
    assert not Granularity.parse("group:4").is_ragged(shape) and not Granularity("channel").is_ragged(shape)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        Granularity.parse(("group", 2)).blocked_shape((8,))


@pytest.mark.parametrize(
    "g, scale_shape, n_rows",
    [
        (Granularity("tensor"), (1, 1, 1, 1), 1),
        (Granularity("channel", axis=0), (6, 1, 1, 1), 6),
        (Granularity("channel", axis=1), (1, 4, 1, 1), 4),
        (Granularity("channel", axis=-1), (1, 1, 1, 3), 3),
        (Granularity("group", group_size=12), (6, 3, 1), 18),
    ],
)
def test_granularity_rows_and_scale_shapes_for_conv_weight(g, scale_shape, n_rows):
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))  # (out, in, kh, kw)
    rows = g.to_rows(w)
    assert rows.shape == (n_rows, w.numel() // n_rows)
    assert g.scale_shape(tuple(w.shape)) == scale_shape
    # each row is exactly the set of elements that share one scale
    per_row = rows.abs().amax(dim=1)
    blocked = w.reshape(g.blocked_shape(tuple(w.shape))).abs()
    amax = blocked.amax(dim=[d for d, n in enumerate(scale_shape) if n == 1], keepdim=True)
    torch.testing.assert_close(g.rows_to_scale(per_row, tuple(w.shape)), amax)


# --------------------------------------------------------------------------- FP8 grids

FP8_KINDS = {"fp8-e4m3": (4, 3, 448.0), "fp8-e5m2": (5, 2, 57344.0)}  # exponent bits, mantissa bits, max


def fp8_reference_values(kind: str) -> dict[int, float]:
    """Every finite bit pattern's value, decoded from the format's definition (not by torch)."""
    e_bits, m_bits, _ = FP8_KINDS[kind]
    bias = (1 << (e_bits - 1)) - 1
    out = {}
    for u in range(256):
        sign = -1.0 if u >> 7 else 1.0
        e, m = (u >> m_bits) & ((1 << e_bits) - 1), u & ((1 << m_bits) - 1)
        if kind == "fp8-e4m3" and e == 15 and m == 7:
            continue  # E4M3 "fn": only S.1111.111 is NaN, no infinities
        if kind == "fp8-e5m2" and e == 31:
            continue  # E5M2: inf and NaN
        frac = m / (1 << m_bits)
        out[u] = sign * (frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    return out


@pytest.mark.parametrize("kind", list(FP8_KINDS))
def test_fp8_every_code_round_trips_and_matches_the_format(kind):
    from specquant.core.grid import dequantize_codes

    spec = GridSpec(8, kind)
    ref = fp8_reference_values(kind)
    assert spec.levels == len(set(ref.values())) and spec.alpha_steps == FP8_KINDS[kind][2]
    codes = torch.tensor(sorted(ref), dtype=torch.float64)  # (n,) every finite pattern
    values = dequantize_codes(codes, torch.ones(1, dtype=torch.float64), torch.zeros(1), spec)
    assert values.tolist() == [ref[u] for u in sorted(ref)]
    back = quantize_codes(values, torch.ones(1, dtype=torch.float64), torch.zeros(1), spec)
    zero = {0, 128}  # +0 and −0 are the same value; every other code comes back as itself
    assert all(int(b) == u or {int(b), u} <= zero for b, u in zip(back.tolist(), sorted(ref)))


@pytest.mark.parametrize("kind", list(FP8_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp8_rounding_is_nearest_ties_to_even_and_saturates(kind, dtype):
    spec = GridSpec(8, kind)
    ref = fp8_reference_values(kind)
    grid = torch.tensor(sorted(set(ref.values())), dtype=torch.float64)  # (levels,) sorted values
    fmax = FP8_KINDS[kind][2]
    g = torch.Generator().manual_seed(3)
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    x = torch.cat([torch.randn(4000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-4, 4, (4000,),
                                                                                                generator=g),
                   mids, grid, torch.tensor([fmax * 1.03, -fmax * 5, 1e30, -1e30], dtype=torch.float64)]).to(dtype)
    one = torch.ones(1, dtype=dtype)
    got = fake_quantize(x, one, torch.zeros(1, dtype=dtype), spec).double()
    xd = x.double().clamp(-fmax, fmax)
    dist = (xd[:, None] - grid[None, :]).abs()  # (n, levels)
    best = dist.min(dim=1).values
    assert torch.equal((got - xd).abs(), best)  # the nearest representable value
    # ties: the neighbour whose code is even (its last mantissa bit 0)
    codes = {v: u for u, v in ref.items() if u < 128}
    tie = (dist == best[:, None]).sum(1) == 2
    for v in got[tie & (x.double() > 0)].tolist():
        assert codes[v] % 2 == 0
    assert got.abs().max() == fmax  # saturated, never inf or NaN
    assert bool(torch.isfinite(got).all())


def test_fp8_scale_maps_the_clipping_value_to_the_format_max():
    spec = GridSpec(8, "fp8-e4m3")
    w = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.25, -0.5]])
    scale, zp = spec.qparams_from_alpha(w.abs().amax(dim=1, keepdim=True))
    assert torch.equal(scale.reshape(-1), torch.tensor([3.0, 2.0]) / 448)
    assert torch.equal(fake_quantize(w, scale, zp, spec).abs().amax(dim=1), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="fp8-e4m3 grid has 8 bits"):
        GridSpec(4, "fp8-e4m3")
