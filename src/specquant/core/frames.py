"""Finite unit-norm tight frames (FUNTFs) in R^d: harmonic and random, analysis and synthesis.

A frame of ``N ≥ d`` vectors ``e_0 … e_{N-1}`` in R^d is stored as a ``(d, N)`` matrix ``F``
whose columns are the frame vectors.  A FUNTF has

* unit-norm columns, ``‖e_n‖ = 1``, and
* a tight frame operator, ``F·Fᵀ = (N/d)·I``,

so every ``v`` is recovered from its frame coefficients ``x_n = ⟨v, e_n⟩`` by the canonical
dual: ``v = (d/N)·Σ_n x_n e_n`` (``analysis`` and ``synthesis`` below, vectorized over the
columns of a ``(d, M)`` matrix).  ``N/d`` is the redundancy.

Harmonic frames (Benedetto, Powell & Yılmaz 2006; used by Czaja & Na 2024) are the sampled
smooth curve
``e_n = sqrt(2/d)·[cos(2π·1·n/N), sin(2π·1·n/N), …, cos(2π·m·n/N), sin(2π·m·n/N)]`` (d = 2m)
with, for odd d = 2m + 1, a leading constant coordinate ``1/sqrt(d)`` (= sqrt(2/d)·1/sqrt(2)).
The path n ↦ e_n is smooth (frame variation Σ‖e_n − e_{n+1}‖ does not grow with N), which is
what Sigma-Delta quantization along the frame index needs.  For even d the frame sums to zero
(Σ e_n = 0), which makes the ΣΔ boundary term vanish for even N (see ``core.sigma_delta``).
One size breaks the standard construction: even d with N = d, where frequency m = N/2 aliases
(its sine row vanishes).  There the frequencies are shifted by one half, k − ½ for k = 1..m,
which is tight for every N ≥ d; the result is an orthonormal basis, as any FUNTF with N = d is.

Random frames are seeded.  ``N = p·d + r`` (0 ≤ r < d) is built as the union of Haar-random
orthonormal bases (each is a FUNTF with N = d, and unions of FUNTFs are FUNTFs) plus, when
r > 0, one random FUNTF of d + r vectors made by alternating projections (Tropp et al. 2005:
polar factor onto tight frames, then column normalisation, until both hold to 1e-12).  When
r ≤ d/2 that last block is made as the Naimark complement of a random FUNTF of d + r vectors
in R^r, where alternating projection converges fast; the columns are randomly permuted.  Random
frames have no smooth ordering, so ΣΔ gains little from them: they are the control.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

FRAME_KINDS = ("harmonic", "random")
MAX_FRAME_ENTRIES = 1 << 27  # d·N above this (1 GiB in float64) is refused as "cannot be built"
_AP_TOL = 1e-12  # alternating projections stop when both FUNTF properties hold to this
_AP_MAX_ITER = 20000


def frame_size(d: int, redundancy: float) -> int:
    """Frame size N = ceil(redundancy·d) (rounded at 1e-9 so 1.5·d is not pushed up by float noise)."""
    _check_dim(d)
    if isinstance(redundancy, bool) or not isinstance(redundancy, (int, float)) or not math.isfinite(redundancy):
        raise ValueError(f"redundancy must be a finite number >= 1, got {redundancy!r}")
    if redundancy < 1:
        raise ValueError(
            f"redundancy must be >= 1 (a frame of N vectors in R^d needs N >= d), got {redundancy!r}"
        )
    return max(d, math.ceil(redundancy * d - 1e-9))


def check_frame_size(d: int, N: int) -> tuple[int, int]:
    """Return ``(d, N)`` if a FUNTF of N vectors in R^d can be built here, else raise ValueError."""
    _check_dim(d)
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)):
        raise ValueError(f"frame size N must be an integer, got {N!r}")
    N = int(N)
    if N < d:
        raise ValueError(
            f"frame size N={N} is smaller than the dimension d={d}: a frame needs N >= d "
            f"(redundancy N/d = {N / d:.3g} < 1)"
        )
    if d * N > MAX_FRAME_ENTRIES:
        raise ValueError(
            f"a frame of N={N} vectors in R^{d} has {d * N:,} entries, more than the "
            f"{MAX_FRAME_ENTRIES:,} that can be built here; lower the redundancy"
        )
    return d, N


def _check_dim(d: int) -> None:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"frame dimension d must be a positive integer, got {d!r}")


def harmonic_frame(d: int, N: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The harmonic FUNTF of N vectors in R^d as a ``(d, N)`` matrix (see the module docstring)."""
    d, N = check_frame_size(d, N)
    m = d // 2
    odd = d % 2 == 1
    F = np.empty((d, N), dtype=np.float64)
    n = np.arange(N, dtype=np.int64)
    k = np.arange(1, m + 1, dtype=np.int64)[:, None]  # (m, 1)
    if not odd and N == d:
        # even d, N = d: frequencies k − ½ (exact phase (2k−1)·n mod 2N over 2N)
        angle = (np.pi / N) * ((2 * k - 1) * n % (2 * N))
    else:
        angle = (2.0 * np.pi / N) * (k * n % N)  # (m, N), phase reduced exactly in integers
    c = math.sqrt(2.0 / d)
    first = 1 if odd else 0
    if odd:
        F[0] = 1.0 / math.sqrt(d)
    F[first::2] = c * np.cos(angle)
    F[first + 1::2] = c * np.sin(angle)
    return torch.from_numpy(F).to(dtype)


def _haar_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random d×d orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    s = np.sign(np.diag(r))
    s[s == 0] = 1.0
    return q * s


def _alternating_projection(s: int, M: int, rng: np.random.Generator) -> np.ndarray:
    """A random FUNTF of M ≥ s vectors in R^s by alternating projections, as an (s, M) array."""
    F = rng.standard_normal((s, M))
    F /= np.linalg.norm(F, axis=0)
    c = M / s
    eye = np.eye(s)
    for _ in range(_AP_MAX_ITER):
        S = F @ F.T
        if np.abs(S - c * eye).max() / c < _AP_TOL:
            return F
        w, V = np.linalg.eigh(S)
        if w.min() <= 0:
            F = rng.standard_normal((s, M))  # degenerate (rank-deficient) start: draw again
        else:
            F = math.sqrt(c) * ((V * w ** -0.5) @ V.T) @ F  # nearest tight frame (polar factor)
        F /= np.linalg.norm(F, axis=0)
    raise ValueError(f"could not build a random unit-norm tight frame of N={M} vectors in R^{s}")


def _random_block(d: int, M: int, rng: np.random.Generator) -> np.ndarray:
    """A random FUNTF of M vectors in R^d with d < M < 2d, as a (d, M) array."""
    r = M - d
    if r > d // 2:
        return _alternating_projection(d, M, rng)
    # Naimark complement of a FUNTF G of M vectors in R^r: P = sqrt(r/M)·G has orthonormal rows,
    # so I − PᵀP projects onto a d-dimensional subspace of R^M with constant diagonal d/M; an
    # orthonormal basis Q of that subspace (unique: QR with positive diagonal of a seeded
    # Gaussian pushed into it) gives the FUNTF sqrt(M/d)·Qᵀ.
    G = _alternating_projection(r, M, rng)
    P = math.sqrt(r / M) * G
    Z = rng.standard_normal((M, d))
    Y = Z - P.T @ (P @ Z)
    q, rr = np.linalg.qr(Y)
    s = np.sign(np.diag(rr))
    s[s == 0] = 1.0
    return math.sqrt(M / d) * (q * s).T


def _one_blas_thread():
    """Limit BLAS to one thread: the many small products of alternating projection run up to
    100x slower with busy-waiting BLAS threads on a loaded machine."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def random_frame(d: int, N: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded random FUNTF of N vectors in R^d as a ``(d, N)`` matrix (see the module docstring)."""
    d, N = check_frame_size(d, N)
    with _one_blas_thread():
        F = _random_frame_np(d, N, seed)
    return torch.from_numpy(F).to(dtype)


def _random_frame_np(d: int, N: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p, r = divmod(N, d)
    blocks = [_haar_orthogonal(d, rng) for _ in range(p - 1 if r else p)]
    if r:
        blocks.append(_random_block(d, d + r, rng))
    F = np.concatenate(blocks, axis=1)[:, rng.permutation(N)]
    F /= np.linalg.norm(F, axis=0)  # exact unit norms (removes rounding only)
    return np.ascontiguousarray(F)


def make_frame(kind: str, d: int, N: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Build a FUNTF of the given kind ("harmonic" or "random"; the seed is used by "random" only)."""
    if kind == "harmonic":
        return harmonic_frame(d, N, dtype)
    if kind == "random":
        return random_frame(d, N, seed, dtype)
    raise ValueError(f"unknown frame kind {kind!r}; allowed: {', '.join(FRAME_KINDS)}")


def analysis(F: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Frame coefficients ``x = Fᵀ·V``: (d, M) → (N, M), or (d,) → (N,)."""
    _check_operand(F, V, F.shape[0], "V")
    return F.transpose(0, 1).to(V.dtype) @ V


def synthesis(F: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Canonical-dual reconstruction ``(d/N)·F·Q``: (N, M) → (d, M), or (N,) → (d,)."""
    _check_operand(F, Q, F.shape[1], "Q")
    d, N = F.shape
    return (F.to(Q.dtype) @ Q) * (d / N)


def _check_operand(F: torch.Tensor, A: torch.Tensor, rows: int, name: str) -> None:
    if F.dim() != 2:
        raise ValueError(f"frame must be a (d, N) matrix, got shape {tuple(F.shape)}")
    if A.dim() not in (1, 2) or A.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},) or ({rows}, M), got {tuple(A.shape)}")


def funtf_errors(F: torch.Tensor) -> tuple[float, float]:
    """(max |‖e_n‖ − 1|, max |F·Fᵀ − (N/d)·I| / (N/d)): both are 0 for an exact FUNTF."""
    F = F.double()
    d, N = F.shape
    norm_err = float((F.norm(dim=0) - 1).abs().max())
    tight_err = float((F @ F.T - (N / d) * torch.eye(d, dtype=F.dtype)).abs().max() / (N / d))
    return norm_err, tight_err


def frame_variation(F: torch.Tensor) -> float:
    """σ(F) = Σ_{n<N-1} ‖e_n − e_{n+1}‖, the quantity in the first-order ΣΔ error bound."""
    F = F.double()
    return float((F[:, 1:] - F[:, :-1]).norm(dim=0).sum())
