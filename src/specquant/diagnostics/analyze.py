"""``analyze(model)``: per-layer spectral and statistical diagnostics, and the claims of the
spectral-limits note checked against measurements.

Per quantizable layer (Linear / Conv1d / Conv2d; a conv weight (out, in, k…) is viewed as the
matrix (out, in·k…); BatchNorm is folded into a deep copy first, as the engine does, when
calibration data or an example input is given):

* shape, parameters, ‖W‖_op = σ_max, σ_min, κ = σ_max/σ_min, effective rank (σ_i > τ·σ_max),
  stable rank ‖W‖_F²/‖W‖_op², excess kurtosis and 3σ-outlier share of the entries;
* the ACIQ clipping point for ``aciq_bits`` (default 4) bits, per tensor: α = r·σ (Gaussian) or
  α = r·b (Laplace, b = mean |w − μ|) with r from Banner et al.'s MSE model
  (:func:`specquant.core.clipping.aciq_alpha_ratio`); the Laplace model is used when the excess
  kurtosis is ≥ 1.5 (nearer a Laplace's 3 than a Gaussian's 0), else the Gaussian, and the
  report says which;
* for each width b: the measured error of round-to-nearest, ‖W − Q_b(W)‖ in operator and
  Frobenius norm, next to the note's two weight-error bounds ‖W‖_op/2^b and √d·max|w|/2^b
  (:mod:`specquant.core.spectral`) and their ratios measured/bound (> 1: the bound fails).
  Q_b is :func:`specquant.core.quantizer.quantize_tensor` with per-channel granularity, a narrow
  symmetric grid and ``clipping="minmax"`` by default (the note's Q_b clips nothing);
* the note's "lock" width ⌈log₂ κ⌉.

With calibration data, the end-to-end output-error bound (every layer at ``bound_bits`` bits,
default 4, same Q_b) next to the measured output error: :mod:`specquant.diagnostics.bounds`.
Measured figures on the zoo are in BENCHMARKS.md ("Spectral diagnostics and bounds").
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from specquant.core import metrics, spectral
from specquant.core.clipping import aciq_alpha_ratio
from specquant.core.quantizer import quantize_tensor
from specquant.core.spectral import lock_bits
from specquant.diagnostics.bounds import EndToEndBound, end_to_end_bound
from specquant.engine.calibrate import as_batches
from specquant.engine.walk import FoldedBN, fold_batchnorm, forward_order, quantizable_layers
from specquant.io.files import jsonable

LAPLACE_KURTOSIS = 1.5  # excess kurtosis at or above which the ACIQ Laplace model is used


def column_glossary(columns) -> dict[str, str]:
    """What each column of :meth:`AnalyzeReport.to_rows` means (``columns``: the keys present;
    the per-width columns ``*_bB`` are explained once, as ``*_b<B>``)."""
    fixed = {
        "name": "module name of the layer",
        "type": "Linear, Conv1d or Conv2d",
        "shape": "weight shape",
        "matrix_shape": "the weight as a matrix: (outputs, inputs × kernel)",
        "params": "number of weights",
        "op_norm": "operator norm ‖W‖_op = σ_max, the largest singular value",
        "sigma_min": "smallest singular value (0 below float64 noise)",
        "kappa": "condition number κ = σ_max/σ_min; large κ: the layer amplifies some input directions far more "
                 "than others and tends to need more bits",
        "lock_bits": "⌈log₂ κ⌉: the spectral rule's extra bits for this layer",
        "effective_rank": "number of singular values above τ·σ_max",
        "stable_rank": "‖W‖_F² / ‖W‖_op²: a smooth count of the significant directions",
        "excess_kurtosis": "excess kurtosis of the weights (0 for a Gaussian; large: heavy tails, outliers)",
        "outlier_share": "share of weights more than 3 standard deviations from the mean",
        "aciq_dist": "distribution model ACIQ uses for the clipping point (laplace when the kurtosis is high, "
                     "else gauss)",
        "aciq_alpha": "ACIQ clipping point α (per tensor, around the mean)",
        "aciq_alpha_over_max": "α / max|w − mean|: below 1, ACIQ clips the largest weights",
    }
    per_width = {
        "rtn_op": "measured ‖W − Q_b(W)‖_op of round-to-nearest at b bits",
        "op_bound": "the note's bound ‖W‖_op / 2^b",
        "op_ratio": "measured / bound in operator norm: above 1 the bound fails (the plot's dashed line at y = 1)",
        "rtn_fro": "measured ‖W − Q_b(W)‖_F at b bits",
        "fro_bound": "the bound √d·max|w| / 2^b",
        "fro_ratio": "measured / bound in Frobenius norm: above 1 the bound fails",
        "sqnr_db": "weight SQNR 10·log10(‖W‖_F² / ‖W − Q_b(W)‖_F²) at b bits, in dB",
    }
    out: dict[str, str] = {}
    for c in columns:
        if c in fixed:
            out[c] = fixed[c]
            continue
        stem, sep, width = c.rpartition("_b")
        if sep and width.isdigit() and stem in per_width and f"{stem}_b<B>" not in out:
            out[f"{stem}_b<B>"] = per_width[stem] + " (B = 2 … 8: one column per width)"
        elif not (sep and width.isdigit() and stem in per_width):
            out[c] = c
    return out


@dataclass
class BitError:
    """Round-to-nearest at one width: measured weight errors next to the note's bounds."""

    bits: int
    op_error: float  # ‖W − Q_b(W)‖_op
    op_bound: float  # ‖W‖_op / 2^b
    op_ratio: float  # op_error / op_bound (> 1: the bound fails)
    fro_error: float  # ‖W − Q_b(W)‖_F
    fro_bound: float  # √d·max|w| / 2^b
    fro_ratio: float  # fro_error / fro_bound
    sqnr_db: float  # 10·log10(‖W‖_F² / ‖W − Q_b(W)‖_F²)


@dataclass
class LayerAnalysis:
    """Diagnostics of one layer (of the BN-folded weight when folding applied)."""

    name: str
    type: str  # Linear / Conv1d / Conv2d
    shape: list[int]  # weight shape
    matrix_shape: list[int]  # (out, in·k…)
    params: int
    op_norm: float  # σ_max
    sigma_min: float  # min(m, n)-th singular value (0 below the float64 noise floor)
    kappa: float  # σ_max/σ_min (inf when σ_min = 0)
    lock_bits: int | None  # ⌈log₂ κ⌉ (None for κ = inf)
    effective_rank: int  # σ_i > τ·σ_max
    stable_rank: float  # ‖W‖_F²/‖W‖_op²
    frobenius_norm: float
    excess_kurtosis: float
    outlier_share: float  # share of entries beyond 3σ of the mean
    aciq_dist: str  # "laplace" or "gauss" (by kurtosis)
    aciq_bits: int  # bits the clipping point is for
    aciq_alpha: float  # clipping point α (per tensor, around the mean)
    aciq_alpha_over_max: float  # α / max|w − μ|
    aciq_clipped_share: float  # share of entries with |w − μ| > α
    rtn: list[BitError] = field(default_factory=list)

    def error(self, bits: int) -> BitError:
        for e in self.rtn:
            if e.bits == bits:
                return e
        raise KeyError(f"no RTN error for {bits} bits in layer '{self.name}'")


@dataclass
class AnalysisReport:
    """What :func:`analyze` found."""

    model: str  # class name of the model
    quantizer: dict  # the Q_b of the RTN columns and the bound
    bits: list[int]
    layers: list[LayerAnalysis]
    folded_bn: list[FoldedBN] = field(default_factory=list)
    end_to_end: EndToEndBound | None = None

    def layer(self, name: str) -> LayerAnalysis:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(name)

    def to_rows(self) -> list[dict]:
        """One flat dict per layer (CSV-ready): statistics, then per width the RTN columns."""
        terms = {t.name: t for t in self.end_to_end.terms} if self.end_to_end else {}
        rows = []
        for la in self.layers:
            r = {
                "name": la.name, "type": la.type, "shape": "x".join(map(str, la.shape)),
                "matrix_shape": "x".join(map(str, la.matrix_shape)), "params": la.params,
                "op_norm": la.op_norm, "sigma_min": la.sigma_min, "kappa": la.kappa, "lock_bits": la.lock_bits,
                "effective_rank": la.effective_rank, "stable_rank": la.stable_rank,
                "excess_kurtosis": la.excess_kurtosis, "outlier_share": la.outlier_share,
                "aciq_dist": la.aciq_dist, "aciq_alpha": la.aciq_alpha, "aciq_alpha_over_max": la.aciq_alpha_over_max,
            }
            for e in la.rtn:
                b = e.bits
                r.update({f"rtn_op_b{b}": e.op_error, f"op_bound_b{b}": e.op_bound, f"op_ratio_b{b}": e.op_ratio,
                          f"rtn_fro_b{b}": e.fro_error, f"fro_bound_b{b}": e.fro_bound,
                          f"fro_ratio_b{b}": e.fro_ratio, f"sqnr_db_b{b}": e.sqnr_db})
            if la.name in terms:
                t = terms[la.name]
                r.update({"e2e_conv_factor": t.conv_factor, "e2e_gain": t.gain, "e2e_eps": t.eps,
                          "e2e_term_mean": t.term_mean})
            rows.append(r)
        return rows

    def to_dict(self) -> dict:
        """Nested, strict-JSON-safe dict (non-finite floats become None; κ = None means singular)."""
        return jsonable({
            "model": self.model, "quantizer": self.quantizer, "bits": self.bits,
            "layers": [dataclasses.asdict(la) for la in self.layers],
            "folded_bn": [dataclasses.asdict(f) for f in self.folded_bn],
            "end_to_end": dataclasses.asdict(self.end_to_end) if self.end_to_end else None,
        })

    def format_table(self) -> str:
        """Human-readable tables: statistics, RTN measured/bound ratios, end-to-end bound."""
        q = self.quantizer
        out = [f"{self.model}: {len(self.layers)} quantizable layers"
               + (f", BN folded into {len(self.folded_bn)}" if self.folded_bn else "")]
        hdr = (f"{'layer':<22}{'matrix':>10}{'params':>9}{'|W|op':>8}{'smin':>9}{'kappa':>9}{'lock':>5}"
               f"{'erank':>6}{'srank':>7}{'kurt':>7}{'out%':>6}{'aciq a/max':>11}")
        out.append(hdr)
        for la in self.layers:
            lock = "-" if la.lock_bits is None else str(la.lock_bits)
            out.append(
                f"{la.name:<22}{'x'.join(map(str, la.matrix_shape)):>10}{la.params:>9}{la.op_norm:>8.3g}"
                f"{la.sigma_min:>9.3g}{la.kappa:>9.3g}{lock:>5}{la.effective_rank:>6}{la.stable_rank:>7.2f}"
                f"{la.excess_kurtosis:>7.2f}{100 * la.outlier_share:>6.2f}"
                f"{la.aciq_alpha_over_max:>7.2f} {la.aciq_dist[0].upper()}"
            )
        out.append(f"ACIQ: {self.layers[0].aciq_bits if self.layers else 4}-bit clipping point over max|w-mean|, "
                   f"L = Laplace model (kurtosis >= {LAPLACE_KURTOSIS}), G = Gaussian")
        out.append("")
        out.append(f"RTN ({q['granularity']}, {'symmetric' if q['symmetric'] else 'asymmetric'}, "
                   f"{q['clipping']} clipping): measured / note bound, op | fro  (> 1: the bound fails)")
        out.append(f"{'layer':<22}" + "".join(f"{'b=' + str(b):>13}" for b in self.bits))
        for la in self.layers:
            out.append(f"{la.name:<22}" + "".join(f"{e.op_ratio:>6.2f}|{e.fro_ratio:<6.2f}" for e in la.rtn))
        e = self.end_to_end
        if e is not None:
            out.append("")
            what = "a true bound (feed-forward chain)" if e.kind == "chain" else f"HEURISTIC ({e.reason})"
            out.append(f"end-to-end, all layers at {e.bits} bits, {e.n_samples} samples: {what}")
            out.append(f"  measured ||f(x)-f_Q(x)||: mean {e.measured_mean:.4g}, max {e.measured_max:.4g} "
                       f"(relative mean {e.relative_mean:.3g})")
            out.append(f"  bound (min of path forms): mean {e.bound_mean:.4g}, max {e.bound_max:.4g}; "
                       f"max measured/bound {e.worst_ratio:.3g}; holds on every sample: {e.holds}")
            out.append(f"  a-priori form (input norm only): mean {e.apriori_mean:.4g}; "
                       f"note's formula as written (no input scale): {e.note_formula:.4g}")
        return "\n".join(out)


# --------------------------------------------------------------------------- per layer


def _aciq(w: torch.Tensor, kurt: float, bits: int) -> tuple[str, float, float, float]:
    x = w.detach().double().flatten()
    mu = x.mean()
    dev = (x - mu).abs()
    dist = "laplace" if kurt >= LAPLACE_KURTOSIS else "gauss"
    spread = float(dev.mean()) if dist == "laplace" else float(x.std(correction=0))
    alpha = aciq_alpha_ratio(bits, dist) * spread
    top = float(dev.max())
    return dist, alpha, (alpha / top if top > 0 else 0.0), float((dev > alpha).double().mean())


def _layer_analysis(name: str, mod: nn.Module, w_hats: dict[int, torch.Tensor], aciq_bits: int,
                    tau: float) -> LayerAnalysis:
    w = mod.weight.detach()
    s = spectral.spectral_summary(w, tau)
    kurt = metrics.excess_kurtosis(w)
    dist, alpha, a_over, clipped = _aciq(w, kurt, aciq_bits)
    rtn = []
    for b, w_hat in w_hats.items():
        op = spectral.op_error_bound(w, w_hat, b)
        fro = spectral.frobenius_error_bound(w, w_hat, b)
        rtn.append(BitError(bits=b, op_error=op.measured, op_bound=op.bound, op_ratio=op.ratio,
                            fro_error=fro.measured, fro_bound=fro.bound, fro_ratio=fro.ratio,
                            sqnr_db=metrics.sqnr(w, w_hat)))
    return LayerAnalysis(
        name=name, type=type(mod).__name__, shape=list(w.shape), matrix_shape=list(s.shape), params=w.numel(),
        op_norm=s.op_norm, sigma_min=s.sigma_min, kappa=s.condition_number, lock_bits=lock_bits(s.condition_number),
        effective_rank=s.effective_rank, stable_rank=s.stable_rank, frobenius_norm=s.frobenius_norm,
        excess_kurtosis=kurt, outlier_share=metrics.outlier_share(w), aciq_dist=dist, aciq_bits=aciq_bits,
        aciq_alpha=alpha, aciq_alpha_over_max=a_over, aciq_clipped_share=clipped, rtn=rtn,
    )




# --------------------------------------------------------------------------- entry point


def analyze(
    model: nn.Module,
    calib=None,
    *,
    bits=range(2, 9),
    example_input: torch.Tensor | None = None,
    fold_bn: bool = True,
    bound_bits: int = 4,
    clipping: str = "minmax",
    granularity: str = "channel",
    symmetric: bool = True,
    aciq_bits: int = 4,
    tau: float = 1e-3,
    batch_size: int = 128,
) -> AnalysisReport:
    """Per-layer diagnostics of ``model`` (unchanged: folding happens on a deep copy).

    Args:
        model: any ``nn.Module`` with Linear / Conv1d / Conv2d layers.
        calib: calibration inputs (tensor (N, …) or batches); enables BN folding, the forward
            layer order and the end-to-end bound at ``bound_bits`` bits.
        bits: widths of the RTN columns.
        example_input: a batch for BN folding and layer order when ``calib`` is None.
        fold_bn: fold BatchNorm into the preceding layer (on a copy) before measuring.
        bound_bits: width of every layer in the end-to-end bound.
        clipping, granularity, symmetric: the RTN quantizer Q_b (see ``quantize_tensor``);
            defaults: per-channel, symmetric, min-max (no clipping, as in the note).
        aciq_bits: width the ACIQ clipping point is computed for.
        tau: effective-rank threshold (σ_i > τ·σ_max).
    """
    widths = sorted({int(b) for b in bits})
    if not widths:
        raise ValueError("bits must name at least one width")
    for b in widths + [bound_bits, aciq_bits]:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"bit widths must be integers in 1..8, got {b!r}")
    batches = as_batches(calib, batch_size) if calib is not None else None
    example = batches[0] if batches else example_input
    base = copy.deepcopy(model).eval()
    folded = fold_batchnorm(base, example) if (fold_bn and example is not None) else []
    names = forward_order(base, example) if example is not None else [n for n, _ in quantizable_layers(base)]
    if not names:
        raise ValueError("the model has no quantizable layers (Linear, Conv1d, Conv2d)")
    mods = dict(base.named_modules())
    qkw = {"granularity": granularity, "symmetric": symmetric, "clipping": clipping}
    layers = []
    bound_hats: dict[str, torch.Tensor] = {}
    for n in names:
        w = mods[n].weight.detach()
        hats = {b: quantize_tensor(w, b, name=f"layer '{n}' weight", **qkw).dequantize() for b in widths}
        layers.append(_layer_analysis(n, mods[n], hats, aciq_bits, tau))
        bound_hats[n] = hats[bound_bits] if bound_bits in hats else quantize_tensor(w, bound_bits, **qkw).dequantize()
    e2e = end_to_end_bound(base, names, bound_hats, bound_bits, batches) if batches else None
    return AnalysisReport(
        model=type(model).__name__, quantizer={**qkw, "rounding": "nearest"}, bits=widths, layers=layers,
        folded_bn=folded, end_to_end=e2e,
    )
