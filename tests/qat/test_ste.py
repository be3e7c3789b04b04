"""The straight-through estimator and LSQ's step gradient (specquant.qat.ste) against their definitions."""
from __future__ import annotations

import pytest
import torch

from specquant.core.actquant import ActQuantizer
from specquant.core.grid import GridSpec, fake_quantize
from specquant.qat.ste import act_fake_quant_ste, fake_quant_ste, grad_scale, lsq_grad_factor, round_ste

GRIDS = [GridSpec(1, "binary"), GridSpec(2, "narrow"), GridSpec(4, "narrow"), GridSpec(3, "asymmetric")]


def _setup(spec: GridSpec, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)  # (out, N0)
    alpha = x.abs().amax(1, keepdim=True) * 0.7  # (out, 1): some entries clip
    if spec.symmetric:
        scale, zp = spec.qparams_from_alpha(alpha)
    else:
        scale, zp = spec.qparams_from_range(-alpha * 0.5, alpha)
    return x, scale, zp


def test_round_ste_is_round_forward_and_identity_backward():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.backward(torch.arange(61.0, dtype=torch.float64))
    assert torch.equal(x.grad, torch.arange(61.0, dtype=torch.float64))


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: f"{s.kind}{s.bits}")
def test_fake_quant_forward_is_core_grid(spec):
    x, scale, zp = _setup(spec)
    assert torch.equal(fake_quant_ste(x, scale, zp, spec.qmin, spec.qmax), fake_quantize(x, scale, zp, spec))


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: f"{s.kind}{s.bits}")
def test_weight_gradient_is_one_inside_the_range_zero_outside(spec):
    x, scale, zp = _setup(spec)
    x.requires_grad_(True)
    fake_quant_ste(x, scale, zp, spec.qmin, spec.qmax).sum().backward()
    t = x.detach() / scale + zp
    inside = (torch.round(t) >= spec.qmin) & (torch.round(t) <= spec.qmax) & (t >= spec.qmin) & (t <= spec.qmax)
    outside = (t < spec.qmin) | (t > spec.qmax)
    assert inside.any() and outside.any()  # both cases are exercised
    assert torch.equal(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert torch.equal(x.grad[outside], torch.zeros_like(x.grad[outside]))


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: f"{s.kind}{s.bits}")
def test_step_gradient_is_lsq_formula(spec):
    """∂ŵ/∂s = round(w/s + z) − z − w/s inside, q_max − z / q_min − z outside (Esser et al. 2020, eq. 3),
    summed over the block and times the upstream gradient; grad_scale multiplies it by g."""
    x, scale, zp = _setup(spec, seed=1)
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # upstream grad
    s = scale.clone().requires_grad_(True)
    g = lsq_grad_factor(x.shape[1], spec.qmax - (spec.symmetric_zero_point if spec.symmetric else 0))
    (fake_quant_ste(x, grad_scale(s, g), zp, spec.qmin, spec.qmax) * up).sum().backward()
    v = x / scale  # (out, N0)
    t = v + zp
    per = torch.where(t > spec.qmax, spec.qmax - zp,
                      torch.where(t < spec.qmin, spec.qmin - zp, torch.round(t) - zp - v))
    expected = (per * up).sum(1, keepdim=True) * g  # (out, 1)
    torch.testing.assert_close(s.grad, expected, rtol=1e-12, atol=1e-12)


def test_grad_scale_keeps_the_value_and_scales_the_gradient():
    s = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y = grad_scale(s, 0.125)
    assert torch.equal(y.detach(), s.detach())
    (y * torch.tensor([1.0, 3.0], dtype=torch.float64)).sum().backward()
    assert torch.equal(s.grad, torch.tensor([0.125, 0.375], dtype=torch.float64))


def test_lsq_grad_factor_is_one_over_sqrt_n_qp():
    assert lsq_grad_factor(100, 1.0) == pytest.approx(0.1)
    assert lsq_grad_factor(16, 7.0) == pytest.approx(1 / (16 * 7) ** 0.5)


def test_zero_scale_blocks_stay_zero_without_gradient():
    spec = GridSpec(4, "narrow")
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([[0.1], [0.0], [0.2]], dtype=torch.float64)
    zp = torch.full_like(scale, spec.symmetric_zero_point)
    y = fake_quant_ste(x, scale, zp, spec.qmin, spec.qmax)
    assert torch.equal(y[1], torch.zeros(8, dtype=torch.float64))
    y.sum().backward()
    assert torch.equal(x.grad[1], torch.zeros(8, dtype=torch.float64))


def test_activation_ste_matches_the_static_quantizer():
    aq = ActQuantizer(bits=4, scale=0.25, zero_point=3)
    x = torch.linspace(-2, 5, 200, requires_grad=True)  # float32, as activations are
    y = act_fake_quant_ste(x, aq)
    assert torch.equal(y.detach(), aq.fake_quantize(x.detach()))
    y.sum().backward()
    t = x.detach() / 0.25 + 3
    inside, outside = (t >= 0) & (t <= 15), (t < 0) | (t > 15)
    assert inside.any() and outside.any()
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum())))


def test_per_token_input_quantizer_passes_the_gradient_straight_through():
    from specquant.core.actquant import TokenActQuantizer

    aq = TokenActQuantizer(4)
    x = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = act_fake_quant_ste(x, aq)
    assert torch.equal(y.detach(), aq.fake_quantize(x.detach()))
    (y * torch.arange(10.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(10.0).expand(3, 6, 10))


def test_learned_activation_step_gradient_is_lsq_formula():
    """With a learned step S the forward values are those of the quantizer with scale S and
    ∂y/∂S = round(x/S) − x/S inside the range, −z below and qmax − z above (Esser et al. 2020)."""
    aq = ActQuantizer(bits=3, scale=0.5, zero_point=2)
    x = torch.linspace(-2.5, 3.5, 97, dtype=torch.float32)
    up = torch.randn(97, generator=torch.Generator().manual_seed(4))
    step = torch.tensor(0.375, requires_grad=True)
    g = lsq_grad_factor(97, 7 - 2)
    y = act_fake_quant_ste(x, aq, grad_scale(step, g))
    assert torch.equal(y.detach(), ActQuantizer(bits=3, scale=0.375, zero_point=2).fake_quantize(x))
    (y * up).sum().backward()
    v = x / 0.375
    per = torch.where(v < -2, torch.tensor(-2.0), torch.where(v > 5, torch.tensor(5.0), torch.round(v) - v))
    assert bool((v < -2).any()) and bool((v > 5).any())
    torch.testing.assert_close(step.grad, (per * up).sum() * g, rtol=1e-5, atol=1e-6)
