"""Coordinate refinement: monotone in the output error, stays on the grid, and a fixed point
is coordinate-wise optimal (no single code change lowers the error)."""
import dataclasses

import pytest
import torch

from specquant.algorithms import GPFQConfig, GPTQConfig, gpfq, gptq
from specquant.algorithms.common import per_column, row_output_error
from specquant.algorithms.refine import refine_codes
from specquant.core.grid import Granularity, GridSpec


def _grid(W, bits):
    spec = GridSpec.default(bits, True)
    gran = Granularity.parse("channel")
    scale = W.abs().amax(1) / spec.qmax  # (out,)
    zp = torch.full_like(scale, spec.symmetric_zero_point)
    return spec, per_column(scale, gran, tuple(W.shape)).double(), per_column(zp, gran, tuple(W.shape)).double()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_refine_is_monotone_and_on_grid(layer_data, stats_from, bits):
    W, X, Xt = layer_data
    st = stats_from(X, Xt)
    spec, S, Z = _grid(W, bits)
    Q0 = (torch.round(W.double() / S).clamp(spec.qmin - spec.symmetric_zero_point,
                                             spec.qmax - spec.symmetric_zero_point)) * S  # RTN start
    errs = [row_output_error(W, Q0, st.H, st.G, st.F)]
    Q = Q0
    for _ in range(3):
        Q = refine_codes(W, Q, st.H, st.G, S, Z, spec, sweeps=1)
        errs.append(row_output_error(W, Q, st.H, st.G, st.F))
    for a, b in zip(errs, errs[1:]):
        assert torch.all(b <= a * (1 + 1e-9) + 1e-12), "a sweep increased some row's output error"
    assert errs[-1].sum() < 0.9 * errs[0].sum()  # and it does real work from an RTN start
    codes = Q / S + Z
    assert torch.allclose(codes, codes.round(), atol=1e-6)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


def test_converged_codes_are_coordinatewise_optimal(layer_data, stats_from):
    W, X, Xt = layer_data
    st = stats_from(X, Xt)
    spec, S, Z = _grid(W, 3)
    Q = refine_codes(W, torch.zeros_like(W, dtype=torch.float64), st.H, st.G, S, Z, spec, sweeps=50)
    base = row_output_error(W, Q, st.H, st.G, st.F)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):  # random single-code moves to every other level never help
        i, t = (int(torch.randint(W.shape[0], (1,), generator=g)), int(torch.randint(W.shape[1], (1,), generator=g)))
        for c in range(spec.qmin, spec.qmax + 1):
            Qc = Q.clone()
            Qc[i, t] = (c - Z[i, t]) * S[i, t]
            assert row_output_error(W, Qc, st.H, st.G, st.F)[i] >= base[i] * (1 - 1e-9) - 1e-12


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_refined_gpfq_and_gptq_not_worse(layer_data, stats_from, bits):
    W, X, Xt = layer_data
    st = stats_from(X, Xt)
    for mod, cfg, G in ((gpfq, GPFQConfig(bits=bits), st.G), (gptq, GPTQConfig(bits=bits), st.H)):
        F = st.F if G is st.G else st.H
        plain = mod.quantize_weight(W, st, cfg).dequantize()
        refined = mod.quantize_weight(W, st, dataclasses.replace(cfg, refine_sweeps=2)).dequantize()
        e0 = row_output_error(W, plain, st.H, G, F).sum()
        e1 = row_output_error(W, refined, st.H, G, F).sum()
        assert e1 <= e0 * (1 + 1e-9), f"{cfg.method}: refinement raised the output error {e0:.4g} → {e1:.4g}"


def test_lazy_blocks_give_the_same_codes(layer_data, stats_from):
    W, X, Xt = layer_data
    st = stats_from(X, Xt)
    spec, S, Z = _grid(W, 2)
    start = torch.zeros_like(W, dtype=torch.float64)
    order = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(3))
    one = refine_codes(W, start, st.H, st.G, S, Z, spec, sweeps=3, col_order=order, block_size=W.shape[1])
    lazy = refine_codes(W, start, st.H, st.G, S, Z, spec, sweeps=3, col_order=order, block_size=5)
    assert torch.allclose(one, lazy, atol=1e-9)


def test_row_chunks_give_the_same_result(layer_data, stats_from):
    """Neurons are independent: processing them in chunks changes nothing (GPFQ path and refinement)."""
    from specquant.algorithms.common import column_order
    from specquant.algorithms.gpfq import path_follow

    W, X, Xt = layer_data
    st = stats_from(X, Xt)
    spec, S, Z = _grid(W, 3)
    order = column_order(st.H, True)
    whole = path_follow(W, st.H, st.G, S, Z, spec, order)
    chunked = path_follow(W, st.H, st.G, S, Z, spec, order, row_chunk=5)
    assert torch.allclose(whole, chunked, atol=1e-12)
    r1 = refine_codes(W, whole, st.H, st.G, S, Z, spec, sweeps=2, col_order=order)
    r2 = refine_codes(W, whole, st.H, st.G, S, Z, spec, sweeps=2, col_order=order, row_chunk=7)
    assert torch.allclose(r1, r2, atol=1e-12)
