"""The κ-regularizer (specquant.qat.kappa): its value against core.spectral, its gradient against
finite differences."""
from __future__ import annotations

import math

import pytest
import torch

from specquant.core.spectral import condition_number
from specquant.qat.kappa import kappa_penalty


@pytest.mark.parametrize("shape", [(5, 8), (7, 3), (4, 2, 3, 3)])
def test_value_is_log_kappa_and_kappa(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kappa = condition_number(w)
    assert float(kappa_penalty(w, "ratio")) == pytest.approx(kappa, rel=1e-12)
    assert float(kappa_penalty(w, "log")) == pytest.approx(math.log(kappa), rel=1e-12)


@pytest.mark.parametrize("kind", ["log", "ratio"])
@pytest.mark.parametrize("shape", [(5, 8), (4, 2, 3, 3)])
def test_gradient_matches_finite_differences(kind, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    kappa_penalty(w, kind).backward()
    grad = w.grad.clone()
    h = 1e-6
    fd = torch.empty_like(grad)
    with torch.no_grad():
        flat = w.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + h
            up = float(kappa_penalty(w, kind))
            flat[i] = old - h
            down = float(kappa_penalty(w, kind))
            flat[i] = old
            fd.view(-1)[i] = (up - down) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)
    assert grad.abs().max() > 1e-3  # a real gradient, not a zero one


def test_gradient_is_the_singular_vector_formula():
    """∂ log κ/∂W = u₁v₁ᵀ/σ₁ − u_r v_rᵀ/σ_r."""
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    kappa_penalty(w).backward()
    u, s, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    expected = torch.outer(u[:, 0], vh[0]) / s[0] - torch.outer(u[:, -1], vh[-1]) / s[-1]
    torch.testing.assert_close(w.grad, expected, rtol=1e-10, atol=1e-12)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown kappa penalty 'max'"):
        kappa_penalty(torch.randn(3, 3), "max")
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        kappa_penalty(torch.randn(5))
    with pytest.raises(ValueError, match="infinite"):
        kappa_penalty(torch.zeros(3, 4))
