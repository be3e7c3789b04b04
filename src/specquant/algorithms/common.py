"""Pieces the data-driven algorithms share: step-size choice, per-column scales, error in
the covariance form, and packaging codes into a ``QuantizedWeight``."""
from __future__ import annotations

import torch

from specquant.core.grid import Granularity, GridSpec, fake_quantize, quantize_codes, round_scale, scale_dtype
from specquant.core.quantizer import compute_qparams
from specquant.core.qweight import QuantizedWeight

SCALE_RULES = ("output-mse", "authors", "minmax", "percentile", "mse", "aciq-gauss", "aciq-laplace")


def check_scale_rule(rule: str) -> str:
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown scale rule {rule!r}; allowed: {', '.join(SCALE_RULES)}")
    return rule


def target_energy(W: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """‖X w_i‖² per row of ``W`` (out, N0), from F = XᵀX (N0, N0), or ``F`` itself when it is
    already that (out,) vector of energies."""
    if F.dim() == 1:
        return F.double()
    W = W.double()
    return (W @ F.double() * W).sum(1)


def row_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, G: torch.Tensor,
                     F: torch.Tensor | None) -> torch.Tensor:
    """‖X w_i − X̃ ŵ_i‖² per row i, from H = X̃ᵀX̃, G = X̃ᵀX and F = XᵀX (N0, N0) or, in its
    place, the (out,) vector of ‖X w_i‖² (all the error needs of F); ``F=None`` leaves that
    constant out (the error up to a per-row constant: enough to compare candidates).
    W, W_hat: (out, N0)."""
    W = W.double()
    Wh = W_hat.double()
    e = -2 * (Wh @ G * W).sum(1) + (Wh @ H * Wh).sum(1)  # (out,)
    if F is None:
        return e
    return (e + target_energy(W, F)).clamp_min(0)


def relative_output_error(W, W_hat, H, G, F) -> float:
    """‖XWᵀ − X̃Ŵᵀ‖_F / ‖XWᵀ‖_F from the covariance statistics (F: matrix or per-row energies)."""
    num = row_output_error(W, W_hat, H, G, F).sum()
    den = target_energy(W, F).sum().clamp_min(1e-300)
    return float((num / den).sqrt())


def choose_scales(
    W: torch.Tensor, spec: GridSpec, gran: Granularity, rule: str,
    H: torch.Tensor | None = None, c_alpha: float = 1.16, candidates: int = 60, store: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, its values exact in the storage dtype ``store``: ``core.grid.round_scale``) and
    zero point for a 2-D weight ``W`` (out, N0).

    Rules: a core range calibrator by name; ``"authors"``: the GPFQ authors' per-tensor step
    δ = C·mean_i(max_j |W_ij|)/2^(b−1); ``"output-mse"``: per output channel, the clip
    α = f·max|w_i| (f on a grid of ``candidates`` values in (0.2, 1]) minimising the
    round-to-nearest output error (w−ŵ)ᵀH(w−ŵ) on the calibration data; per group (granularity
    "group"), the same search on each group's own range against its own inputs' block of H,
    (w_g−ŵ_g)ᵀH_gg(w_g−ŵ_g) — the group's share of the output error, cross-group terms left out,
    as AWQ's clip search does.  Needs ``H``; falls back to weight MSE for a per-tensor grid or
    without data.  f = 1 (the min/max range) is always a candidate.
    """
    check_scale_rule(rule)
    scale, zp = _choose_scales(W, spec, gran, rule, H, c_alpha, candidates)
    return round_scale(scale, store), zp


def _choose_scales(W, spec, gran, rule, H, c_alpha, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """``choose_scales`` before the scales are rounded to their storage dtype."""
    if rule == "authors":
        if not spec.symmetric or spec.fp8 is not None:
            raise ValueError(f"the 'authors' step rule needs a symmetric integer grid, not {spec.kind}")
        delta = c_alpha * W.abs().amax(dim=1).mean() / (1 << (spec.bits - 1))
        shape = gran.scale_shape(tuple(W.shape))
        scale = torch.full(shape, float(delta), device=W.device)
        return scale, torch.full(shape, spec.symmetric_zero_point, device=W.device)
    if rule == "output-mse" and (H is None or gran.kind not in ("channel", "group") or spec.kind == "binary"):
        rule = "mse"
    if rule != "output-mse":
        return compute_qparams(W, spec, gran, clipping=rule)
    if gran.kind == "group":
        return _group_output_mse(W, H, spec, gran, candidates)
    Wd = W.double()
    Hd = H.double()
    s, z = _clip_candidates(Wd, spec, candidates, whole_range_first=False)  # (K, out)
    # Residuals of all candidates at once would take K·out·N0 doubles (a GiB for a 4096×512
    # layer) and make the search memory-bound: work on tiles of about 2^20 entries instead
    # (rows are independent; the numbers are the same).
    tile = 1 << 20
    rows = max(1, tile // Wd.shape[1])
    per = max(1, tile // (min(rows, Wd.shape[0]) * Wd.shape[1]))  # candidates per tile
    blocks = []
    for r in range(0, Wd.shape[0], rows):
        parts = [_rtn_output_error(Wd[r:r + rows], Hd, s[k:k + per, r:r + rows], z[k:k + per, r:r + rows], spec)
                 for k in range(0, s.shape[0], per)]
        blocks.append(torch.cat(parts))  # (K, rows)
    err = torch.cat(blocks, dim=1)  # (K, out)
    best = err.argmin(dim=0)  # (out,)
    idx = torch.arange(W.shape[0], device=err.device)
    s, z = s[best, idx], z[best, idx]
    shape = gran.scale_shape(tuple(W.shape))
    return s.float().reshape(shape), z.float().reshape(shape)


def _clip_candidates(Wd: torch.Tensor, spec: GridSpec, candidates: int,
                     whole_range_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (K, out) of the ranges f·[min, max] (f·max|w| symmetric) of each row of
    ``Wd`` (out, n), f on ``candidates`` points of (0.2, 1]; ``whole_range_first``: in decreasing order,
    f = 1 first, so that a tie (a group whose inputs are never active, H_gg = 0) keeps the whole range
    (the per-channel search keeps its original increasing order)."""
    f = torch.linspace(0.2, 1.0, candidates, dtype=torch.float64, device=Wd.device)  # (K,)
    f = (f.flip(0) if whole_range_first else f)[:, None]  # (K, 1)
    if spec.symmetric:
        return spec.qparams_from_alpha(f * Wd.abs().amax(dim=1))  # (K, out)
    return spec.qparams_from_range(f * Wd.amin(dim=1), f * Wd.amax(dim=1))


def _group_output_mse(W, H, spec, gran, candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group): the clip of the group's range minimising (w_g−ŵ_g)ᵀH_gg(w_g−ŵ_g)."""
    out, n = W.shape
    size, groups = gran.group_len((out, n)), gran.num_groups((out, n))
    Wd, Hd = W.double(), H.double()
    scale = torch.empty(out, groups, dtype=torch.float64, device=W.device)  # (out, groups)
    zp = torch.empty_like(scale)
    idx = torch.arange(out, device=W.device)
    rows = max(1, (1 << 20) // (candidates * size))  # tiles of about 2^20 residual entries
    for j in range(groups):
        a, b = j * size, min((j + 1) * size, n)  # the last group may be shorter
        Wg, Hg = Wd[:, a:b], Hd[a:b, a:b]  # (out, g), (g, g)
        s, z = _clip_candidates(Wg, spec, candidates)  # (K, out)
        err = torch.cat([_rtn_output_error(Wg[r:r + rows], Hg, s[:, r:r + rows], z[:, r:r + rows], spec)
                         for r in range(0, out, rows)], dim=1)  # (K, out)
        best = err.argmin(dim=0)  # (out,)
        scale[:, j], zp[:, j] = s[best, idx], z[best, idx]
    shape = gran.scale_shape(tuple(W.shape))  # (out, groups, 1)
    return scale.float().reshape(shape), zp.float().reshape(shape)


def _rtn_output_error(Wd, Hd, s, z, spec) -> torch.Tensor:
    """(w − ŵ)ᵀH(w − ŵ) per (candidate, row) for round-to-nearest with scales ``s`` (k, out)."""
    D = Wd - fake_quantize(Wd, s[..., None], z[..., None], spec)  # (k, out, N0)
    return ((D @ Hd) * D).sum(-1)  # (k, out)


def per_column(t: torch.Tensor, gran: Granularity, shape: tuple[int, int]) -> torch.Tensor:
    """Expand a scale/zero point to one value per weight entry (out, N0) (a shorter last group
    included: ``Granularity.per_entry``)."""
    return gran.per_entry(t, shape)


def to_quantized_weight(
    W_hat: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: GridSpec, gran: Granularity,
    algorithm: str, info: dict, dtype: torch.dtype = torch.float32, store: str = "float32",
) -> QuantizedWeight:
    """Codes of an (out, N0) tensor whose entries already lie on the grid; ``store``: the scales'
    storage dtype (their values must be exact in it: ``choose_scales(..., store=...)``)."""
    blocked = gran.to_blocks(W_hat.double())  # blocked_shape, a shorter last group padded
    codes = quantize_codes(blocked, scale.double(), zp.double(), spec)
    return QuantizedWeight(
        codes=gran.from_blocks(codes, tuple(W_hat.shape)).to(torch.uint8), scale=scale.float(), zero_point=zp.float(),
        spec=spec, granularity=gran, dtype=dtype, algorithm=algorithm, info=info, scale_dtype=scale_dtype(store),
    )


def column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Processing order of the input columns: by decreasing ‖X̃_t‖² (activation order) or natural."""
    n = H.shape[0]
    if not act_order:
        return torch.arange(n, device=H.device)
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)
