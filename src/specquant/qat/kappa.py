"""The κ-regularizer of the spectral-limits note (``shared/seeds/000_…``, step 6):

    L = L_task(f_Q(θ)(x), y) + λ · Σ_l penalty(W_l)

with penalty(W) = log κ(W) = log σ_max(W) − log σ_min(W) (``kind="log"``, the default: scale-free
and of the same size for every layer) or κ(W) = ‖W‖_op / σ_min(W) (``kind="ratio"``, the note's
literal form).  A conv weight is viewed as its (out, in·kh·kw) matrix, as in ``core.spectral``.

The gradient is autograd's through the singular values: ∂σ_i/∂W = u_i v_iᵀ (exact where σ_max and
σ_min are simple), so ∂ log κ/∂W = u_1 v_1ᵀ/σ_1 − u_r v_rᵀ/σ_r; the tests check it against finite
differences.  Pure functions on tensors: no module is read here.
"""
from __future__ import annotations

import torch

KAPPA_KINDS = ("log", "ratio")


def kappa_penalty(w: torch.Tensor, kind: str = "log") -> torch.Tensor:
    """log κ(W) (``kind="log"``) or κ(W) (``kind="ratio"``) of the matrix view of ``w``, differentiable.

    Raises a one-line ValueError for an unknown kind, a weight with fewer than 2 dimensions, or a
    matrix whose smallest singular value is 0 (κ infinite)."""
    if kind not in KAPPA_KINDS:
        raise ValueError(f"unknown kappa penalty {kind!r}; allowed: {', '.join(KAPPA_KINDS)}")
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(f"the kappa penalty needs a non-empty weight with >= 2 dimensions, got shape {tuple(w.shape)}")
    m = w.reshape(w.shape[0], -1)  # (out, N0)
    s = torch.linalg.svdvals(m)  # (min(out, N0),) descending
    if not bool(s[-1] > 0):
        raise ValueError(f"the kappa penalty of a weight of shape {tuple(w.shape)} is infinite (sigma_min = 0)")
    if kind == "log":
        return torch.log(s[0]) - torch.log(s[-1])
    return s[0] / s[-1]
