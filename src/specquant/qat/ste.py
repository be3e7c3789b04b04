"""Fake quantization with the straight-through estimator (pure tensor functions).

Rounding has zero gradient almost everywhere, so quantization-aware training replaces its
derivative by 1: the straight-through estimator (STE) of Bengio, Léonard and Courville 2013,
"Estimating or propagating gradients through stochastic neurons for conditional computation".
:func:`round_ste` is round(x) in the forward pass and the identity in the backward pass.

:func:`fake_quant_ste` is the quantize-dequantize map of :mod:`specquant.core.grid`,
ŵ = (clamp(round(w/s + z), q_min, q_max) − z)·s, written so that autograd gives

* ∂ŵ/∂w = 1 where the code is not clamped (w inside the grid's range), 0 outside
  (the *clipped* STE: the hardtanh estimator of BinaryConnect / Hubara et al. 2016 at 1 bit);
* ∂ŵ/∂s = round(w/s + z) − z − w/s inside the range, q_max − z or q_min − z outside:
  the step-size gradient of LSQ (Esser et al., "Learned step size quantization", ICLR 2020,
  eq. 3, with z = 0 for their signed grid).

:func:`grad_scale` multiplies a gradient by LSQ's g = 1/√(N·Q_P) without changing the value.
The forward values are the very float operations of ``core.grid.quantize_codes`` and
``dequantize_codes`` (x / s + z, round half to even, clamp; (u − z)·s), so the codes written back
after training give exactly the weights the network was trained with.
"""
from __future__ import annotations

import math

import torch

from specquant.core.actquant import ActQuantizer


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (half to even, as ``torch.round``), identity backward (STE, Bengio et al. 2013)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward, its gradient times ``g`` backward (LSQ's step-size gradient scale, Esser et al. 2020)."""
    return (x - x * g).detach() + x * g


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: float,
                   qmax: float) -> torch.Tensor:
    """(clamp(round(x/s + z), qmin, qmax) − z)·s with the clipped STE for ``x`` and LSQ's gradient for ``s``.

    ``scale`` and ``zero_point`` broadcast against ``x`` (e.g. (out, 1) for per-channel scales of an
    (out, N0) weight).  Blocks with ``scale == 0`` give 0 (and no gradient), as ``core.grid`` does.
    """
    live = scale > 0
    safe = torch.where(live, scale, torch.ones_like(scale))  # broadcast shape of scale
    t = x / safe + zero_point  # (…) position on the code axis
    # codes: clamped before rounding (the same values, as qmin and qmax are integers), so that the
    # gradient is 0 exactly where t leaves [qmin, qmax] and not only where round(t) does
    u = round_ste(t.clamp(qmin, qmax))
    return torch.where(live, (u - zero_point) * safe, torch.zeros_like(u))


def lsq_grad_factor(block_size: int, q_positive: float) -> float:
    """LSQ's step-size gradient scale g = 1/√(N·Q_P) (Esser et al. 2020, section 2.2): N the number of
    values sharing the step, Q_P the number of positive levels (at least ½, the binary grid's)."""
    return 1.0 / math.sqrt(max(1, block_size) * max(q_positive, 0.5))


def act_fake_quant_ste(x: torch.Tensor, aq: ActQuantizer, step: torch.Tensor | None = None) -> torch.Tensor:
    """``aq.fake_quantize(x)`` (a static per-tensor asymmetric activation quantizer) with the clipped STE:
    the same forward values, gradient 1 inside the quantizer's range and 0 outside.

    ``step``: a learned step S (a 0-d tensor, LSQ: pass it through ``grad_scale`` with
    ``lsq_grad_factor(features, qmax − z)``) in place of ``aq.scale``; its gradient is LSQ's,
    round(x/S) − x/S inside the range and −z or qmax − z outside (Esser et al. 2020, eq. 3),
    with the zero point held."""
    if aq.granularity == "token":  # a per-token range follows each row's min and max: plain STE, gradient 1
        return x + (aq.fake_quantize(x) - x).detach()
    s = torch.tensor(aq.scale, dtype=torch.float32, device=x.device) if step is None else step
    z = float(aq.zero_point)
    v = (x.float() / s).clamp(-z, aq.qmax - z)  # (…) clamped before rounding: gradient 0 outside the range
    u = round_ste(v) + z  # the codes: clamp(round(x/S) + Z, 0, qmax), the same values as aq.codes(x)
    return ((u - z) * s).to(x.dtype)
