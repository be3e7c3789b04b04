"""Fake-quant layers for quantization-aware training, built from a PTQ result, and the way back.

``prepare_qat(model)`` replaces every module that ``specquant.quantize`` quantized (an
``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with ``.qweight``, a uniform grid) by a
:class:`FakeQuantLayer` that holds

* the latent float weight, initialised from the PTQ dequantized weight, so training starts
  exactly where PTQ ended (the first forward pass gives the PTQ model's outputs);
* the layer's grid: kind, bits, granularity, zero points (fixed), and its scales, fixed or
  learned (LSQ, Esser et al., ICLR 2020);
* its static input quantizer (``.act_quant``, activation PTQ), applied with the STE; with LSQ its
  step is learned as well (zero point held) and written back into ``.act_quant`` at the end;
* optionally (``batch_norm=True``, convolutions only) a BatchNorm on its output, trained with batch
  statistics: the network trains as it did before PTQ folded its BatchNorms, and at the end the
  normalisation folds exactly into the per-channel scales and the bias (codes unchanged).

In the forward pass the codes are re-rounded from the latent weight at every step
(``ste.fake_quant_ste``: the STE of Bengio et al. 2013).  ``finalize_qat(model)`` puts the
original modules back with the final codes as a ``QuantizedWeight`` on the same grid,
granularity and layout (``.qweight``) and the weight set to its dequantized value, which is what
``specquant.save`` packs: the saved model gives the trained model's outputs.

``unpack_model(model)`` turns the packed layers of a loaded file (``specquant.load``) back into
float modules with ``.qweight`` (and ``.act_quant``), the form ``quantize`` leaves a model in.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from specquant.core.grid import round_scale
from specquant.core.layouts import RowsLayout
from specquant.core.qweight import FrameQuantizedWeight, QuantizedWeight
from specquant.engine.actquant import install_input_quantizer
from specquant.nn.layers import QuantConv1d, QuantConv2d, QuantLinear, _QuantLayer
from specquant.qat.ste import act_fake_quant_ste, fake_quant_ste, grad_scale, lsq_grad_factor

QAT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class FakeQuantLayer(nn.Module):
    """One quantized layer in training: a latent float weight, re-rounded on its grid in every forward pass.

    ``module`` is the original layer (its ``weight`` Parameter is the latent weight, its bias is
    trained in float); ``qweight`` the PTQ result that gives the grid and the starting point;
    ``lsq`` learns the scales (one per block, LSQ's gradient scale), else they stay as PTQ chose them.
    """

    def __init__(self, name: str, module: nn.Module, qweight: QuantizedWeight, lsq: bool = False,
                 batch_norm: bool = False):
        super().__init__()
        if type(module) not in QAT_TYPES:
            raise ValueError(f"layer '{name}': QAT trains Linear/Conv1d/Conv2d layers, got {type(module).__name__}")
        if type(qweight) is not QuantizedWeight or isinstance(qweight.layout, RowsLayout):
            what = "frame codes" if isinstance(qweight, FrameQuantizedWeight) else "rows of mixed widths"
            raise ValueError(f"layer '{name}': QAT needs one uniform grid per layer, this PTQ result has {what}")
        act = getattr(module, "act_quant", None)
        if qweight.spec.fp8 is not None or (act is not None and act.grid != "int"):
            raise ValueError(f"layer '{name}': QAT re-rounds on integer grids; this PTQ result has FP8 "
                             f"{'weights' if qweight.spec.fp8 is not None else 'activations'}")
        shape = tuple(module.weight.shape)
        if qweight.shape != shape:
            raise ValueError(f"layer '{name}': its qweight has shape {qweight.shape}, the weight {shape}")
        self.name = name
        self.module = module
        self.qweight = qweight  # the PTQ result: grid, granularity, layout, storage dtype of the scales
        g = qweight.granularity
        with torch.no_grad():
            module.weight.copy_(qweight.dequantize().to(module.weight.dtype))  # start where PTQ ended
        scale = qweight.scale.detach().float().clone()  # granularity.scale_shape(shape)
        self.register_buffer("zero_point", qweight.zero_point.detach().float().clone())
        self.register_buffer("live", scale > 0)  # blocks with a zero scale stay exactly 0
        self.lsq = bool(lsq)
        if self.lsq:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        spec = qweight.spec
        self.qmin, self.qmax = float(spec.qmin), float(spec.qmax)
        block = g.group_len(shape) if g.kind == "group" else (
            module.weight.numel() // shape[0] if g.kind == "channel" else module.weight.numel())
        q_pos = spec.qmax - spec.symmetric_zero_point if spec.symmetric else float(spec.qmax)
        self.g_factor = lsq_grad_factor(block, q_pos)
        self.act_quant = getattr(module, "act_quant", None)
        # LSQ learns the step of a static input quantizer too (its zero point held): Esser et al. learn both
        self.learn_act = self.lsq and self.act_quant is not None and self.act_quant.granularity == "tensor"
        if self.learn_act:
            self.act_scale = nn.Parameter(torch.tensor(float(self.act_quant.scale), dtype=torch.float32))
        # BatchNorm on the output (convolutions): started as the identity by ``start_batch_norm``
        self.bn: nn.Module | None = None
        self.bn_stats: list | None = None  # while ``start_batch_norm`` runs: [count, Σy, Σy²] per channel
        if batch_norm and isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if g.kind == "tensor" or (g.kind == "channel" and g.axis % module.weight.dim() != 0):
                raise ValueError(f"layer '{name}': batch_norm QAT folds the normalisation into one scale per "
                                 f"output channel; this layer's scales are {g.kind}-wise (axis {g.axis})")
            cls = nn.BatchNorm2d if isinstance(module, nn.Conv2d) else nn.BatchNorm1d
            self.bn = cls(shape[0]).to(module.weight.device)  # affine, running statistics

    def act_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """The learned input step (LSQ, gradient scaled by 1/sqrt(features·Q_P)), or None when fixed."""
        if not self.learn_act:
            return None
        features = x[0].numel() if x.dim() > 1 else x.numel()  # one sample's inputs
        q_pos = max(self.act_quant.qmax - self.act_quant.zero_point, 1)
        return grad_scale(self.act_scale, lsq_grad_factor(features, q_pos)).clamp_min(torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def final_act_quant(self):
        """The input quantizer to keep: the PTQ one, or, with LSQ, the same with the learned step (float32)."""
        if not self.learn_act:
            return self.act_quant
        step = float(self.act_scale.detach().float().clamp_min(torch.finfo(torch.float32).tiny))
        return dataclasses.replace(self.act_quant, scale=step)

    def step(self) -> torch.Tensor:
        """The scales used in the forward pass (LSQ: positive, gradient scaled by g)."""
        if not self.lsq:
            return self.scale
        s = grad_scale(self.scale, self.g_factor).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(self.live, s, torch.zeros_like(s))

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (the module's shape), differentiable w.r.t. the latent weight and LSQ scales."""
        w = self.module.weight  # (out, …) latent
        g = self.qweight.granularity
        wb = g.to_blocks(w)  # blocked_shape: scale broadcasts here
        q = fake_quant_ste(wb, self.step(), self.zero_point, self.qmin, self.qmax)
        return g.from_blocks(q, tuple(w.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = act_fake_quant_ste(x, self.act_quant, self.act_step(x))  # STE inside its range
        w = self.quantized_weight()
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, w, m.bias)  # (…, out)
        y = m._conv_forward(x, w, m.bias)  # (B, out, …)
        if self.bn is None:
            return y
        if self.bn_stats is not None:  # start_batch_norm: gather the output's statistics, pass it through
            yc = y.detach().transpose(0, 1).reshape(y.shape[1], -1).double()  # (out, B·positions)
            self.bn_stats[0] += yc.shape[1]
            self.bn_stats[1] += yc.sum(1)
            self.bn_stats[2] += (yc * yc).sum(1)
            return y
        return self.bn(y)

    @torch.no_grad()
    def bn_fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The BatchNorm in eval mode as y ↦ a·y + c per output channel: (a, c), each (out,)."""
        bn = self.bn
        a = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
        c = bn.bias.detach().double() - a * bn.running_mean.double()  # (out,)
        return a, c

    @torch.no_grad()
    def final_qweight(self) -> QuantizedWeight:
        """The codes of the latent weight on the (final) grid, as a QuantizedWeight with the PTQ layout."""
        qw = self.qweight
        g = qw.granularity
        scale = self.step().detach().float()
        scale = round_scale(scale, qw.scale_dtype, f"layer '{self.name}' scale")  # the stored value
        wb = g.to_blocks(self.module.weight.detach().float())  # blocked_shape
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        t = torch.where(scale > 0, wb / safe + self.zero_point, torch.zeros_like(wb) + self.zero_point)
        codes = g.from_blocks(torch.round(t).clamp(self.qmin, self.qmax), qw.shape).to(torch.uint8)
        if self.bn is not None:  # a·(s·(q − z)) = (a·s)·(q − z): the normalisation's gain goes into the row's scales
            a, _ = self.bn_fold()
            if not bool((a > 0).all()):
                c = int(torch.nonzero(a <= 0)[0, 0])
                raise ValueError(f"layer '{self.name}': its BatchNorm gain on output channel {c} is {float(a[c]):.3g}; "
                                 "only a positive gain folds into the scales (train without batch_norm)")
            rows = a.to(scale.dtype).reshape((-1,) + (1,) * (scale.dim() - 1))  # (out, 1, …)
            scale = round_scale(scale * rows, qw.scale_dtype, f"layer '{self.name}' scale")
        return dataclasses.replace(qw, codes=codes, scale=scale, zero_point=self.zero_point.clone(),
                                   algorithm=f"qat+{qw.algorithm}", info={**qw.info, "qat_lsq": self.lsq})


def qat_layers(model: nn.Module) -> list[FakeQuantLayer]:
    """The fake-quant layers of a prepared model, in module order."""
    return [m for m in model.modules() if isinstance(m, FakeQuantLayer)]


def prepare_qat(model: nn.Module, lsq: bool = False, batch_norm: bool = False) -> list[FakeQuantLayer]:
    """Replace every module with a uniform ``.qweight`` by a :class:`FakeQuantLayer` (in place);
    ``batch_norm``: each convolution gains a BatchNorm on its output (see the module docstring).

    Packed layers of a loaded file are unpacked first (:func:`unpack_model`).  Raises a one-line
    ValueError when no layer is quantized or a layer's PTQ result has no single uniform grid."""
    unpack_model(model)
    targets = [(n, m) for n, m in model.named_modules() if n and getattr(m, "qweight", None) is not None]
    if not targets:
        raise ValueError("the model has no quantized layer (.qweight): quantize it first (specquant.quantize) "
                         "or load a quantized file")
    seen: dict[int, str] = {}
    for name, mod in targets:
        if id(mod.weight) in seen:
            raise ValueError(f"layer '{name}' shares its weight with '{seen[id(mod.weight)]}': tied weights are "
                             "not supported by QAT")
        seen[id(mod.weight)] = name
    layers = []
    for name, mod in targets:
        layers.append(FakeQuantLayer(name, mod, mod.qweight, lsq=lsq, batch_norm=batch_norm))
    if batch_norm and not any(layer.bn is not None for layer in layers):
        raise ValueError("batch_norm: the model has no quantized convolution to train with a BatchNorm")
    for layer in layers:
        _set_module(model, layer.name, layer)
    return layers


def finalize_qat(model: nn.Module) -> list[str]:
    """Put the original modules back with their trained codes (``.qweight``) and dequantized weights;
    returns the names of the layers written back."""
    names = []
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLayer)]:
        qw = layer.final_qweight()
        mod = layer.module
        with torch.no_grad():
            mod.weight.copy_(qw.dequantize().to(mod.weight.dtype))
            if layer.bn is not None:  # a·(conv + b) + c: the bias becomes a·b + c
                a, c = layer.bn_fold()
                b = mod.bias.detach().double() if mod.bias is not None else torch.zeros_like(a)
                new_bias = (a * b + c).to(mod.weight.dtype)
                if mod.bias is None:
                    mod.bias = nn.Parameter(new_bias)
                else:
                    mod.bias.copy_(new_bias)
        mod.qweight = qw
        if layer.act_quant is not None:
            install_input_quantizer(mod, layer.final_act_quant())
        _set_module(model, name, mod)
        names.append(name)
    return names


def float_module(layer: _QuantLayer) -> nn.Module:
    """The float module a packed layer stands for: its dequantized weight and bias, ``.qweight`` (the
    packed codes, unpacked) and its input quantizer as ``.act_quant`` (with the engine's hook)."""
    w = layer.dequantized_weight()
    bias = layer.bias is not None
    if isinstance(layer, QuantLinear):
        mod = nn.Linear(layer.in_features, layer.out_features, bias=bias)
    elif isinstance(layer, (QuantConv1d, QuantConv2d)):
        cls = nn.Conv2d if isinstance(layer, QuantConv2d) else nn.Conv1d
        mod = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=bias,
                  padding_mode=layer.padding_mode)
    else:
        raise ValueError(f"cannot unpack a {type(layer).__name__}")
    with torch.no_grad():
        mod.weight.copy_(w)
        if bias:
            mod.bias.copy_(layer.bias.detach())
    mod.to(w.device)
    mod.qweight = layer.to_quantized_weight()
    if layer.input_quant is not None:
        install_input_quantizer(mod, layer.input_quant)
    return mod


def unpack_model(model: nn.Module) -> list[str]:
    """Replace the packed layers of ``model`` (``specquant.load``) by float modules with ``.qweight``; in
    place, returns their names.  A tied packed layer becomes its own module (QAT refuses ties anyway)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, _QuantLayer)]
    for name in names:
        _set_module(model, name, float_module(model.get_submodule(name)))
    return names
