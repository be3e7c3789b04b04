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

End-to-end bound (with calibration data; ``bound_bits`` bits, default 4, same Q_b).  Let the
network be a chain x_l = φ_l(A_l x_{l−1} + β_l), l = 1..L, of linear layers A_l and activations
φ_l that are 1-Lipschitz with φ(0) = 0 (ReLU, LeakyReLU with |slope| ≤ 1, ReLU6, Hardtanh
around 0, Tanh; Identity, Flatten, Dropout in eval), and let the quantized chain x̃_l use Â_l
(weights Ŵ_l, the same biases β_l).  With δ_l = ‖x_l − x̃_l‖ and the Lipschitz property,

    δ_l ≤ ‖A_l x_{l−1} − Â_l x̃_{l−1}‖ = ‖A_l(x_{l−1} − x̃_{l−1}) + (A_l − Â_l) x̃_{l−1}‖
        ≤ ‖A_l‖ δ_{l−1} + ‖A_l − Â_l‖·‖x̃_{l−1}‖,           δ_0 = 0,

so, unrolled, for every input x

    ‖f(x) − f_Q(x)‖ ≤ Σ_l (Π_{j>l} ‖A_j‖) · ‖A_l − Â_l‖ · ‖x̃_{l−1}(x)‖          (quantized path)

and, splitting the other way (Â_l(x_{l−1} − x̃_{l−1}) + (A_l − Â_l)x_{l−1}),

    ‖f(x) − f_Q(x)‖ ≤ Σ_l (Π_{j>l} ‖Â_j‖) · ‖A_l − Â_l‖ · ‖x_{l−1}(x)‖           (float path).

Both hold; the reported bound is their minimum, per sample, with the layer inputs' norms
measured on the calibration samples.  For a Linear layer ‖A_l‖ = ‖W_l‖_op and
‖A_l − Â_l‖ = ε_l = ‖W_l − Q_b(W_l)‖_op.  For a convolution with zero padding, every input entry
lies in at most c_l patches (c_l = Π_i ⌈k_i/(s_i/gcd(s_i, d_i))⌉ over the spatial dims: kernel
k, stride s, dilation d), so ‖A_l‖ ≤ √c_l·‖W_l‖_op and ‖A_l − Â_l‖ ≤ √c_l·ε_l; those upper
bounds are used, and the bound stays valid.  The note's own form Σ_l (Π_{j>l}‖W_j‖_op)·ε_l lacks
the scale of the layer inputs; the *a-priori* version reported next to it replaces ‖x̃_{l−1}‖ by
its bound ã_{l−1} from the input alone: ã_0 = ‖x‖, ã_l = ‖Â_l‖·ã_{l−1} + ‖β_l‖ (β_l broadcast
over the output positions), which is valid too and shows how much the norms of the layers
*before* l (missing from the note) contribute.  The note's formula as written is also reported
(a single number, no input scale; not a bound).

Whether a model is such a chain is read from one forward pass: every leaf module is called
once, each is a Linear/Conv (zero padding) or one of the activations above, and each one's
input equals (after flattening) the previous one's output, the model's output being the last
one's.  For anything else (residual networks: the skip connections add and the average pool
and BN glue are not in the chain) the same sum over the layers in forward order is computed
and reported with ``kind="heuristic"``: it is then neither an upper nor a lower bound, and the
report shows how it compares with the measurement.  The measured error is
‖f(x) − f_Q(x)‖₂ of the flattened outputs (logits) per calibration sample, reported as its mean
and max over the samples; all of this is computed in float64.

On the zoo (``benchmarks/mixed_pareto.py``; RTN per-channel min-max): the note's operator-norm
bound fails in every layer at b = 2..4 (measured/bound 1.4–4.2 on ResNet-20, 0.9–3.2 on
mnist-mlp: ‖W − Q_b(W)‖_op behaves like a random matrix's norm, not like ‖W‖_op/2^b); the
Frobenius bound holds (ratios 0.25–0.99).  On mnist-mlp at 4 bits the chain bound holds on all
256 samples but is loose (mean 94.7 against a measured mean of 1.30); the note's formula as
written gives 3.31, below the largest measured error (3.73): without the input scale it is not
a bound.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from specquant.core import metrics, spectral
from specquant.core.clipping import aciq_alpha_ratio
from specquant.core.quantizer import quantize_tensor
from specquant.engine.calibrate import as_batches
from specquant.engine.walk import QUANTIZABLE, FoldedBN, fold_batchnorm, forward_order, quantizable_layers

LAPLACE_KURTOSIS = 1.5  # excess kurtosis at or above which the ACIQ Laplace model is used


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
class BoundTerm:
    """One layer's part of the end-to-end bound."""

    name: str
    conv_factor: int  # c_l (1 for Linear)
    gain: float  # √c_l·‖W_l‖_op, upper bound on the layer's operator norm
    gain_quantized: float  # √c_l·‖Ŵ_l‖_op
    eps: float  # ε_l = ‖W_l − Q_b(W_l)‖_op
    term_mean: float  # mean over samples of (Π_{j>l} gain_j)·√c_l·ε_l·‖x̃_{l−1}‖


@dataclass
class EndToEndBound:
    """The output error bound next to the measured output error on calibration samples."""

    bits: int  # b of Q_b in every layer
    kind: str  # "chain" (a true bound) or "heuristic" (not a chain: see reason)
    reason: str  # why the model is not a chain ("" for a chain)
    n_samples: int
    measured_mean: float  # mean_x ‖f(x) − f_Q(x)‖
    measured_max: float  # max_x ‖f(x) − f_Q(x)‖
    relative_mean: float  # mean_x ‖f(x) − f_Q(x)‖ / ‖f(x)‖
    bound_mean: float  # mean_x of the per-sample bound (min of the two path forms)
    bound_max: float  # max_x of the per-sample bound
    worst_ratio: float  # max_x measured(x)/bound(x) (≤ 1 when the bound holds)
    holds: bool  # bound(x) ≥ measured(x) for every sample
    quant_path_mean: float  # mean of the quantized-path form
    float_path_mean: float  # mean of the float-path form
    apriori_mean: float  # mean of the a-priori form (input norms only)
    apriori_max: float
    note_formula: float  # Σ_l (Π_{j>l}‖W_j‖_op)·ε_l as written in the note (no input scale)
    terms: list[BoundTerm] = field(default_factory=list)


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
        return _json_safe({
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


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


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
    from specquant.mixed.policies import lock_bits

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


# --------------------------------------------------------------------------- chain check


def conv_overlap(mod: nn.Module) -> int:
    """c_l: the most patches of ``mod`` any input entry lies in (1 for Linear)."""
    if isinstance(mod, nn.Linear):
        return 1
    c = 1
    for k, s, d in zip(mod.kernel_size, mod.stride, mod.dilation):
        period = s // math.gcd(s, d)
        c *= -(-k // period)
    return c


def _lipschitz_leaf(mod: nn.Module) -> bool:
    if isinstance(mod, QUANTIZABLE):
        return not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or mod.padding_mode == "zeros"
    if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)):
        return True
    if isinstance(mod, nn.LeakyReLU):
        return abs(mod.negative_slope) <= 1
    if isinstance(mod, nn.Hardtanh):
        return mod.min_val <= 0 <= mod.max_val
    return False


def _same_values(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape[:1] != b.shape[:1] or a.numel() != b.numel():
        return False
    return torch.equal(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def chain_check(model: nn.Module, x: torch.Tensor) -> tuple[bool, str]:
    """Whether ``model`` is a feed-forward chain of linear layers and 1-Lipschitz activations
    (see the module docstring), and if not, why.  Read from one forward pass on ``x``."""
    calls = []
    handles = []
    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            def hook(m, args, out, name=name):
                calls.append((name, m, args[0] if args else None, out))
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    names = [c[0] for c in calls]
    if not calls:
        return False, "no modules are called"
    if len(set(names)) != len(names):
        return False, "a module is called more than once"
    prev = x
    for name, mod, inp, out in calls:
        if not _lipschitz_leaf(mod):
            return False, f"'{name}' ({type(mod).__name__}) is neither a linear layer nor a 1-Lipschitz activation"
        if not _same_values(inp, prev):
            return False, f"the input of '{name}' is not the previous module's output (skip connection or glue)"
        prev = out
    if not _same_values(y, prev):
        return False, "the model's output is not its last module's output"
    return True, ""


# --------------------------------------------------------------------------- end to end


def _input_norms(model: nn.Module, names: list[str], batches: list[torch.Tensor]):
    """Flattened outputs (N, K), and per layer: per-sample input norms (N,) and output positions."""
    mods = dict(model.named_modules())
    norms: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    positions: dict[str, int] = {}
    handles = []
    for n in names:
        def pre(_m, args, n=n):
            if len(norms[n]) < batch_no[0] + 1:
                x = args[0]
                norms[n].append(x.reshape(x.shape[0], -1).norm(dim=1))

        def post(m, _args, out, n=n):
            positions[n] = out[0].numel() // m.weight.shape[0]
        handles.append(mods[n].register_forward_pre_hook(pre))
        handles.append(mods[n].register_forward_hook(post))
    batch_no = [0]
    outs = []
    try:
        with torch.inference_mode():
            for i, x in enumerate(batches):
                batch_no[0] = i
                y = model(x)
                if not isinstance(y, torch.Tensor):
                    raise ValueError("the end-to-end bound needs a model that returns one tensor")
                outs.append(y.reshape(y.shape[0], -1))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if len(norms[n]) != len(batches)]
    if missing:
        raise ValueError(f"layers not called on every calibration batch: {', '.join(missing)}")
    return torch.cat(outs), {n: torch.cat(v) for n, v in norms.items()}, positions


def _end_to_end(base: nn.Module, names: list[str], w_hats: dict[str, torch.Tensor], bits: int,
                batches: list[torch.Tensor]) -> EndToEndBound:
    fm = copy.deepcopy(base).double().eval()
    qm = copy.deepcopy(base).double().eval()
    qmods, fmods = dict(qm.named_modules()), dict(fm.named_modules())
    with torch.no_grad():
        for n in names:
            qmods[n].weight.copy_(w_hats[n].to(torch.float64).reshape(qmods[n].weight.shape))
    xb = [x.detach().double() for x in batches]
    is_chain, reason = chain_check(fm, xb[0])
    f_out, f_norms, positions = _input_norms(fm, names, xb)
    q_out, q_norms, _ = _input_norms(qm, names, xb)
    measured = (f_out - q_out).norm(dim=1)  # (N,)
    ref = f_out.norm(dim=1)

    L = len(names)
    conv_c = [conv_overlap(fmods[n]) for n in names]
    gain = [math.sqrt(c) * spectral.operator_norm(fmods[n].weight) for c, n in zip(conv_c, names)]
    gain_q = [math.sqrt(c) * spectral.operator_norm(qmods[n].weight) for c, n in zip(conv_c, names)]
    eps = [float(torch.linalg.matrix_norm(spectral.as_matrix((fmods[n].weight - qmods[n].weight).detach()), ord=2))
           for n in names]
    eps_g = [math.sqrt(c) * e for c, e in zip(conv_c, eps)]
    after = [1.0] * (L + 1)  # after[l] = Π_{j>l} gain_j ; after_q likewise with Ŵ
    after_q = [1.0] * (L + 1)
    for i in range(L - 1, -1, -1):
        after[i] = after[i + 1] * (gain[i + 1] if i + 1 < L else 1.0)
        after_q[i] = after_q[i + 1] * (gain_q[i + 1] if i + 1 < L else 1.0)
    n_samples = measured.shape[0]
    quant_path = torch.zeros(n_samples, dtype=torch.float64)
    float_path = torch.zeros(n_samples, dtype=torch.float64)
    apriori = torch.zeros(n_samples, dtype=torch.float64)
    a_prev = torch.cat([x.reshape(x.shape[0], -1).norm(dim=1) for x in xb])  # ã_0 = ‖x‖
    terms = []
    for i, n in enumerate(names):
        t = after[i] * eps_g[i] * q_norms[n]
        quant_path += t
        float_path += after_q[i] * eps_g[i] * f_norms[n]
        apriori += after[i] * eps_g[i] * a_prev
        bias = qmods[n].bias
        bias_norm = float(bias.detach().norm()) * math.sqrt(positions[n]) if bias is not None else 0.0
        a_prev = gain_q[i] * a_prev + bias_norm
        terms.append(BoundTerm(name=n, conv_factor=conv_c[i], gain=gain[i], gain_quantized=gain_q[i], eps=eps[i],
                               term_mean=float(t.mean())))
    bound = torch.minimum(quant_path, float_path)
    ratio = torch.where(bound > 0, measured / bound.clamp_min(1e-300),
                        torch.where(measured > 0, torch.full_like(measured, math.inf), torch.zeros_like(measured)))
    plain = [spectral.operator_norm(fmods[n].weight) for n in names]
    note = sum(math.prod(plain[i + 1:]) * eps[i] for i in range(L))
    return EndToEndBound(
        bits=bits, kind="chain" if is_chain else "heuristic", reason=reason, n_samples=n_samples,
        measured_mean=float(measured.mean()), measured_max=float(measured.max()),
        relative_mean=float((measured / ref.clamp_min(1e-300)).mean()),
        bound_mean=float(bound.mean()), bound_max=float(bound.max()), worst_ratio=float(ratio.max()),
        holds=bool((bound >= measured).all()), quant_path_mean=float(quant_path.mean()),
        float_path_mean=float(float_path.mean()), apriori_mean=float(apriori.mean()),
        apriori_max=float(apriori.max()), note_formula=float(note), terms=terms,
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
    e2e = _end_to_end(base, names, bound_hats, bound_bits, batches) if batches else None
    return AnalysisReport(
        model=type(model).__name__, quantizer={**qkw, "rounding": "nearest"}, bits=widths, layers=layers,
        folded_bn=folded, end_to_end=e2e,
    )
