"""The end-to-end output-error bound that :func:`specquant.diagnostics.analyze.analyze` reports
with calibration data (every layer at ``bound_bits`` bits, default 4, with analyze's Q_b), next
to the measured output error.

Let the network be a chain x_l = φ_l(A_l x_{l−1} + β_l), l = 1..L, of linear layers A_l and
activations φ_l that are 1-Lipschitz with φ(0) = 0 (ReLU, LeakyReLU with |slope| ≤ 1, ReLU6,
Hardtanh around 0, Tanh; Identity, Flatten, Dropout in eval), and let the quantized chain x̃_l
use Â_l (weights Ŵ_l, the same biases β_l).  With δ_l = ‖x_l − x̃_l‖ and the Lipschitz property,

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
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from specquant.core import spectral
from specquant.engine.walk import QUANTIZABLE


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


def end_to_end_bound(base: nn.Module, names: list[str], w_hats: dict[str, torch.Tensor], bits: int,
                     batches: list[torch.Tensor]) -> EndToEndBound:
    """The bound of the module docstring for the layers ``names`` of ``base`` (BN already folded)
    quantized to ``w_hats`` (name -> Ŵ), measured on the calibration ``batches``; ``base`` is
    unchanged (float64 copies are used)."""
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
