"""``finetune``: quantization-aware training of a PTQ result on a labelled training split.

The model comes out of ``specquant.quantize`` (or ``specquant.load``): each quantized layer is
trained as a :class:`~specquant.qat.layers.FakeQuantLayer` (latent float weight initialised from
the PTQ weight, codes re-rounded every step with the STE of Bengio et al. 2013, scales fixed or
learned with LSQ, Esser et al., ICLR 2020), optionally with the κ-regularizer of the
spectral-limits note (``qat.kappa``) and distillation from a float teacher (``qat.distill``,
Hinton et al. 2015), and the final codes are written back as ``.qweight`` so that
``specquant.save`` packs them like any PTQ result.

Every random choice (the order of the samples, the crops and flips, mixup's pairs and weights) is
drawn from one generator seeded by ``seed``: the same seed on the same machine and thread count
gives the same model.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specquant.qat.distill import blend_with_teacher, feature_loss
from specquant.qat.kappa import KAPPA_KINDS, kappa_penalty
from specquant.qat.layers import finalize_qat, prepare_qat

AUGMENTS = ("none", "crop-flip")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class QATConfig:
    """Settings of one fine-tuning run (epochs, learning rate and seed are ``finetune``'s arguments)."""

    batch_size: int = 128  # samples per step
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9, Nesterov)
    weight_decay: float = 0.0  # on the latent weights and biases (not on LSQ scales)
    lsq: bool = False  # learn the weight scales and static input steps (LSQ); False: keep the PTQ ones
    kappa_reg: float = 0.0  # λ of the κ-regularizer, summed over the quantized layers (0: off)
    kappa_kind: str = "log"  # "log": log κ(W); "ratio": ‖W‖_op/σ_min (qat.kappa)
    augment: str = "none"  # "crop-flip": random 4-pixel-padded crops and horizontal flips (images)
    cosine: bool = True  # cosine learning-rate decay to 0 over all steps (else constant)
    distill_alpha: float = 0.5  # with a teacher: weight α of the soft (KL) term, 1 − α on the labels' CE
    distill_temperature: float = 4.0  # with a teacher: temperature T of the softened logits
    scale_lr_factor: float = 1.0  # LSQ: the steps' learning rate is lr × this (Adam moves every parameter by
    #                               about lr per step, a large relative change for steps of 0.01–0.1)
    mixup: float = 0.0  # mixup (Zhang et al., ICLR 2018): each batch blended with a shuffled copy of itself by
    #                     λ ~ Beta(mixup, mixup), the label loss mixed by λ; with a teacher the soft targets are
    #                     the teacher's outputs on the blended inputs (0: off)
    batch_norm: bool = False  # train each quantized convolution with a BatchNorm on its output (batch statistics,
    #                           as before PTQ folded the BatchNorms), started as the identity on the start model's
    #                           output statistics, re-estimated on the (augmented, unmixed) training data at the
    #                           end and folded into the per-channel scales and the bias: codes and layout unchanged
    bn_samples: int = 2048  # training samples that start (and, at the end, re-estimate) those statistics
    feature_distill: float = 0.0  # with a teacher: weight β of the feature term, the mean over ``feature_layers`` of
    #                               ‖s − t‖²/‖t‖² between the student's and the teacher's outputs of that module on
    #                               the same batch (qat.distill.feature_loss), added to the loss (0: off)
    feature_layers: tuple[str, ...] = ()  # module names present in student and teacher whose outputs are matched
    #                                       (e.g. ResNet's residual blocks "layer1.0", …); needed when β > 0
    ema: float = 0.0  # decay d of an exponential moving average of the trained parameters (latent weights, biases,
    #                   learned steps, BatchNorm gains; Polyak averaging), which replaces them at the end; the
    #                   first steps use min(d, (1 + t)/(10 + t)) so the average does not remember the start (0: off)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.bn_samples, bool) or not isinstance(self.bn_samples, int) or self.bn_samples < 1:
            raise ValueError(f"bn_samples must be a positive integer, got {self.bn_samples!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"unknown augmentation {self.augment!r}; allowed: {', '.join(AUGMENTS)}")
        if self.kappa_kind not in KAPPA_KINDS:
            raise ValueError(f"unknown kappa penalty {self.kappa_kind!r}; allowed: {', '.join(KAPPA_KINDS)}")
        for what in ("weight_decay", "kappa_reg"):
            v = getattr(self, what)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
        v = self.scale_lr_factor
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"scale_lr_factor must be a finite number > 0, got {v!r}")
        e = self.ema
        if isinstance(e, bool) or not (isinstance(e, (int, float)) and 0 <= e < 1):
            raise ValueError(f"ema must be a decay in [0, 1) (0: off), got {e!r}")
        m = self.mixup
        if isinstance(m, bool) or not (isinstance(m, (int, float)) and math.isfinite(m) and m >= 0):
            raise ValueError(f"mixup must be a finite number >= 0 (the Beta parameter; 0: off), got {m!r}")
        f = self.feature_distill
        if isinstance(f, bool) or not (isinstance(f, (int, float)) and math.isfinite(f) and f >= 0):
            raise ValueError(f"feature_distill must be a finite number >= 0 (0: off), got {f!r}")
        if isinstance(self.feature_layers, str) or not all(isinstance(n, str) and n for n in self.feature_layers):
            raise ValueError(f"feature_layers must be a sequence of module names, got {self.feature_layers!r}")
        self.feature_layers = tuple(self.feature_layers)
        if f > 0 and not self.feature_layers:
            raise ValueError("feature_distill > 0 needs feature_layers: the modules whose outputs are matched")
        a, t = self.distill_alpha, self.distill_temperature
        if isinstance(a, bool) or not (isinstance(a, (int, float)) and 0 <= a <= 1):
            raise ValueError(f"distill_alpha must be a number in [0, 1], got {a!r}")
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"distill_temperature must be a finite number > 0, got {t!r}")


@dataclass
class QATResult:
    """What one ``finetune`` call did."""

    epochs: int  # epochs trained
    steps: int  # optimizer steps
    lr: float  # peak learning rate
    seed: int  # seed of the shuffling and augmentation
    n_train: int  # training samples
    train_seconds: float  # wall time of the training loop
    epoch_loss: list[float] = field(default_factory=list)  # mean task loss per epoch (training data)
    epoch_accuracy: list[float] = field(default_factory=list)  # training top-1 (%) per epoch, augmented batches
    epoch_kappa: list[float] = field(default_factory=list)  # with kappa_reg: mean penalty over the layers per epoch
    epoch_feature: list[float] = field(default_factory=list)  # with feature_distill: mean feature term per epoch
    layers: list[str] = field(default_factory=list)  # the layers trained and written back
    distilled: bool = False  # trained against a teacher's softened outputs (qat.distill)
    config: dict = field(default_factory=dict)  # the QATConfig as a dict

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded images and random horizontal flips (x (B, C, H, W)), drawn from ``gen``."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)  # (B,) crop offsets
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5  # (B,)
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)  # (B, W)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    idx_b = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    out = xp.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def mix_batch(x: torch.Tensor, gen: torch.Generator, concentration: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

    Returns (λ·x + (1 − λ)·x[perm], perm, λ) with λ ~ Beta(c, c) and a random permutation of the
    batch, both drawn from ``gen`` (λ through Gamma variates: Beta(c, c) = G₁ / (G₁ + G₂)).
    """
    b = x.shape[0]
    perm = torch.randperm(b, generator=gen)  # (B,)
    # torch's Gamma sampler takes no generator: seed a private one from ``gen`` so the run stays reproducible.
    sub = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    g = torch._standard_gamma(torch.full((2,), float(concentration), dtype=torch.float64), generator=sub)  # (2,)
    lam = float(g[0] / (g[0] + g[1])) if float(g.sum()) > 0 else 0.5
    return lam * x + (1 - lam) * x[perm.to(x.device)], perm, lam


def _check_data(train_data) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(train_data, (tuple, list)) and len(train_data) == 2):
        raise ValueError("train_data must be a pair (x, y) of tensors: inputs (N, …) and integer labels (N,)")
    x, y = train_data
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ValueError("train_data must be a pair (x, y) of tensors")
    if y.dim() != 1 or y.is_floating_point() or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"train_data: expected x (N, …) and integer labels y (N,), got x {tuple(x.shape)} and "
                         f"y {tuple(y.shape)} {y.dtype}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("train_data: x holds NaN or Inf values")
    return x, y


def check_feature_layers(config: QATConfig, model: nn.Module, teacher: nn.Module | None) -> None:
    """With ``config.feature_distill`` > 0: a teacher is given and every ``config.feature_layers`` name is
    a module of both networks (ValueError, one line, otherwise)."""
    if config.feature_distill <= 0:
        return
    if teacher is None:
        raise ValueError("feature_distill > 0 needs a teacher (finetune(teacher=...)) to take the features from")
    for who, m in (("student", model), ("teacher", teacher)):
        names = {n for n, _ in m.named_modules()}
        missing = [n for n in config.feature_layers if n not in names]
        if missing:
            raise ValueError(f"feature_layers: the {who} has no module {missing[0]!r}")


def finetune(model: nn.Module, train_data, config: QATConfig | None = None, epochs: int = 1, lr: float = 1e-4,
             seed: int = 0, progress: Callable[[int, int], None] | None = None,
             teacher: nn.Module | None = None) -> QATResult:
    """Quantization-aware fine-tuning of a quantized model, in place; returns a :class:`QATResult`.

    Args:
        model: a model whose quantized layers hold ``.qweight`` (``specquant.quantize``) or are packed
            layers (``specquant.load``); the PTQ codes and scales are the starting point.
        train_data: (x, y): training inputs (N, …) and integer labels (N,) — a training split, never
            the test set.
        config: a :class:`QATConfig` (default: Adam, fixed scales, no penalty, no augmentation).
        epochs: passes over ``train_data``.
        lr: peak learning rate (cosine decay with ``config.cosine``).  With fixed scales a code changes
            only when its latent weight crosses half a step: SGD at 0.01 barely moves ResNet-20's
            latent weights in a few epochs, Adam at 1e-4 (the default) does.
        seed: seed of the sample order and the augmentation.
        progress: ``progress(done_steps, total_steps)`` after every step (e.g. ``cli.common.EtaProgress``).
        teacher: a model (e.g. the float model) whose outputs on the same (augmented) batches the
            student is distilled towards: loss (1 − α)·CE + α·T²·KL (``config.distill_alpha``,
            ``config.distill_temperature``; ``qat.distill``).  Run in eval mode, never trained.
    After the call each quantized module holds its trained codes as ``.qweight`` (same grid, granularity
    and layout as the PTQ result) and its weight is their dequantized value; ``specquant.save`` packs it.
    """
    config = config if config is not None else QATConfig()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    x, y = _check_data(train_data)
    if config.augment == "crop-flip" and x.dim() != 4:
        raise ValueError(f"augment 'crop-flip' needs images (N, C, H, W), got inputs of shape {tuple(x.shape)}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if teacher is not None and teacher is model:
        raise ValueError("teacher must be another model than the one trained (e.g. a copy of the float model)")
    check_feature_layers(config, model, teacher)
    layers = prepare_qat(model, lsq=config.lsq, batch_norm=config.batch_norm)
    try:
        if config.batch_norm:  # prepare_qat gave at least one convolution a BatchNorm (or refused)
            start_batch_norm(model, layers, x, config, seed)
        result = _train(model, layers, x, y, config, epochs, float(lr), seed, progress, teacher)
        if config.batch_norm:
            reestimate_batch_norm(model, layers, x, config, seed)
        return result
    finally:
        finalize_qat(model)  # the trained codes written back (also when training stops early)
        model.eval()


def _bn_batches(x: torch.Tensor, config: QATConfig, seed: int, augment: bool):
    """``config.bn_samples`` training samples drawn with ``seed``, in batches (cropped and flipped when
    ``augment`` and the config augments)."""
    gen = torch.Generator().manual_seed(seed)
    xs = x[torch.randperm(x.shape[0], generator=gen)[:config.bn_samples]]
    for s in range(0, xs.shape[0], config.batch_size):
        xb = xs[s:s + config.batch_size]
        if augment and config.augment == "crop-flip":
            xb = crop_flip(xb, gen)
        yield xb


@torch.no_grad()
def start_batch_norm(model: nn.Module, layers, x: torch.Tensor, config: QATConfig, seed: int = 0) -> None:
    """Set each output BatchNorm to the identity on the start model: running mean μ and variance σ² of
    the convolution's output over ``config.bn_samples`` training samples (seeded, unaugmented), gain
    sqrt(σ² + eps) and shift μ, so that the eval-mode network is the PTQ network."""
    device = next(model.parameters()).device
    bns = [layer for layer in layers if layer.bn is not None]
    was = model.training
    model.eval()
    for layer in bns:
        out = layer.bn.num_features
        layer.bn_stats = [0, torch.zeros(out, dtype=torch.float64, device=device),
                          torch.zeros(out, dtype=torch.float64, device=device)]
    try:
        for xb in _bn_batches(x, config, seed, augment=False):
            model(xb.to(device))
        for layer in bns:
            n, s1, s2 = layer.bn_stats
            mean = s1 / n  # (out,)
            var = (s2 / n - mean * mean).clamp_min(0)  # (out,) biased, as BatchNorm normalises
            bn = layer.bn
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
            bn.weight.copy_(torch.sqrt(var + bn.eps).to(bn.weight.dtype))
            bn.bias.copy_(mean.to(bn.bias.dtype))
    finally:
        for layer in bns:
            layer.bn_stats = None
        model.train(was)


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, layers, x: torch.Tensor, config: QATConfig, seed: int) -> None:
    """Recompute each output BatchNorm's running statistics with the trained weights: batch statistics
    averaged over ``config.bn_samples`` training samples (seeded, cropped and flipped, never mixed) —
    the moving averages of training followed mixed batches and moving weights."""
    device = next(model.parameters()).device
    bns = [layer.bn for layer in layers if layer.bn is not None]
    was = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    try:
        for xb in _bn_batches(x, config, seed + 1, augment=True):
            model(xb.to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was)


class _Outputs:
    """The outputs of named modules in the last forward pass (forward hooks; ``close`` removes them)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], who: str) -> None:
        self.names, self.who, self.out = names, who, {}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"feature_layers: {self.who} module {name!r} returned {type(output).__name__}, "
                                 "not a tensor")
            self.out[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.out]
        if missing:
            raise ValueError(f"feature_layers: {self.who} module {missing[0]!r} did not run in the forward pass")
        vals = [self.out[n] for n in self.names]
        self.out = {}
        return vals

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.out = [], {}


def _train(model: nn.Module, layers, x: torch.Tensor, y: torch.Tensor, config: QATConfig, epochs: int, lr: float,
           seed: int, progress, teacher: nn.Module | None = None) -> QATResult:
    feats = None
    if config.feature_distill > 0:  # finetune checked the teacher and the names
        feats = (_Outputs(model, config.feature_layers, "student"), _Outputs(teacher, config.feature_layers, "teacher"))
    try:
        return _train_loop(model, layers, x, y, config, epochs, lr, seed, progress, teacher, feats)
    finally:
        if feats is not None:
            for f in feats:
                f.close()


def _train_loop(model: nn.Module, layers, x: torch.Tensor, y: torch.Tensor, config: QATConfig, epochs: int,
                lr: float, seed: int, progress, teacher: nn.Module | None, feats) -> QATResult:
    device = next(model.parameters()).device
    scales = [p for layer in layers for n, p in layer.named_parameters(recurse=False)
              if n in ("scale", "act_scale")]  # LSQ steps of the weights and of the inputs: no weight decay
    ids = {id(p) for p in scales}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": params, "weight_decay": config.weight_decay}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "lr_factor": config.scale_lr_factor})
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    n = x.shape[0]
    steps_per_epoch = -(-n // config.batch_size)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    result = QATResult(epochs=epochs, steps=0, lr=lr, seed=seed, n_train=n, train_seconds=0.0,
                       layers=[layer.name for layer in layers], config=dict(config.__dict__),
                       distilled=teacher is not None)
    trained = [p for g in groups for p in g["params"]]
    shadow = [p.detach().clone() for p in trained] if config.ema > 0 else None  # the moving averages
    t0 = time.perf_counter()
    model.train()
    if teacher is not None:
        teacher.eval()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)  # (N,)
        loss_sum, correct, feature_sum = 0.0, 0, 0.0
        for s in range(0, n, config.batch_size):
            idx = order[s:s + config.batch_size]
            xb = x[idx]
            if config.augment == "crop-flip":
                xb = crop_flip(xb, gen)
            xb, yb = xb.to(device), y[idx].to(device)
            lam, perm = 1.0, None
            if config.mixup > 0:
                xb, perm, lam = mix_batch(xb, gen, config.mixup)
            for g in opt.param_groups:
                peak = lr * g.get("lr_factor", 1.0)
                g["lr"] = 0.5 * peak * (1 + math.cos(math.pi * result.steps / total)) if config.cosine else peak
            out = model(xb)  # (B, classes)
            loss = F.cross_entropy(out, yb)
            if perm is not None:  # mixed inputs: the label loss is mixed by the same λ
                loss = lam * loss + (1 - lam) * F.cross_entropy(out, yb[perm.to(device)])
            total_loss = loss
            if teacher is not None:
                with torch.no_grad():
                    soft = teacher(xb)  # (B, classes)
                total_loss = blend_with_teacher(loss, out, soft, config.distill_alpha, config.distill_temperature)
                if feats is not None:
                    term = feature_loss(feats[0].take(), feats[1].take())
                    total_loss = total_loss + config.feature_distill * term
                    feature_sum += float(term.detach()) * idx.numel()
            if config.kappa_reg > 0:
                penalty = sum(kappa_penalty(layer.module.weight, config.kappa_kind) for layer in layers)
                total_loss = total_loss + config.kappa_reg * penalty
            if not bool(torch.isfinite(total_loss.detach())):
                raise ValueError(f"QAT diverged at step {result.steps + 1}: the loss is {float(total_loss.detach())}; "
                                 "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            opt.step()
            result.steps += 1
            if shadow is not None:
                d = min(config.ema, (1 + result.steps) / (10 + result.steps))
                with torch.no_grad():
                    torch._foreach_lerp_(shadow, [p.detach() for p in trained], 1 - d)
            loss_sum += float(loss.detach()) * idx.numel()
            correct += int((out.argmax(1) == yb).sum())
            if progress is not None:
                progress(result.steps, total)
        result.epoch_loss.append(loss_sum / n)
        result.epoch_accuracy.append(100.0 * correct / n)
        if feats is not None:
            result.epoch_feature.append(feature_sum / n)
        if config.kappa_reg > 0:
            with torch.no_grad():
                result.epoch_kappa.append(sum(float(kappa_penalty(layer.module.weight, config.kappa_kind))
                                              for layer in layers) / len(layers))
    if shadow is not None:  # the averaged parameters are the result
        with torch.no_grad():
            for p, a in zip(trained, shadow):
                p.copy_(a)
    result.train_seconds = time.perf_counter() - t0
    return result
