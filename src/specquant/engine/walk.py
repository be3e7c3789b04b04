"""Find the quantizable layers of a model, in forward order, and fold BatchNorm into convs.

Both use hooks on one real forward pass (no tracing), so any ``forward()`` works: residual
networks, transformer blocks, functional glue between modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class SkippedModule:
    """A module with parameters that the engine leaves alone, and why."""

    name: str  # module name in the model
    type: str  # class name
    reason: str  # why it is not quantized


@dataclass
class FoldedBN:
    """A BatchNorm folded into the conv (or linear) that feeds it."""

    bn: str  # BatchNorm module name (replaced by Identity)
    into: str  # conv / linear module name that absorbed it


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1d / Conv2d, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the quantizable layers in the order the forward pass first calls them.

    Layers never called by ``forward`` are left out.
    """
    order: list[str] = []
    handles = []
    for name, mod in quantizable_layers(model):
        def hook(_m, _inp, name=name):
            if name not in order:
                order.append(name)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def skipped_modules(model: nn.Module, quantized: set[str], folded: set[str]) -> list[SkippedModule]:
    """Modules that own parameters but are not quantized, with the reason."""
    out = []
    for name, mod in model.named_modules():
        if name in quantized or name in folded or name == "":
            continue
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        if isinstance(mod, QUANTIZABLE):
            reason = "excluded by the configuration or never called by forward()"
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            reason = "BatchNorm not directly after a conv/linear: kept in float"
        else:
            reason = f"{type(mod).__name__} is not a quantizable type (Linear, Conv1d, Conv2d): kept in float"
        out.append(SkippedModule(name, type(mod).__name__, reason))
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[FoldedBN]:
    """Fold each BatchNorm whose input is exactly the output of a conv/linear into it.

    The pairing is read from one forward pass: a BN is folded when the tensor it receives is
    the very tensor a conv/linear returned and nothing else reads that tensor.  The BN is
    replaced by ``nn.Identity`` and the producer gains the affine map (a bias if it had none).
    Must be called in eval mode (running statistics are used).
    """
    from torch.overrides import TorchFunctionMode

    mods = dict(model.named_modules())
    produced: dict[int, str] = {}  # id of a conv/linear output -> producer name
    readers: dict[int, set] = {}  # id of a produced tensor -> who computed a tensor from it
    inside: list[str] = []  # stack of leaf modules now running (their ops count as one reader)
    n_ops = [0]
    pairs: list[tuple[str, str, int]] = []
    keep: list = []  # every tensor seen stays alive during the pass, so ids are never reused

    class CountReads(TorchFunctionMode):
        """Counts every torch op (functional glue included) that reads a conv/linear output."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            keep.append(out)
            if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out
                                                 and isinstance(out[0], torch.Tensor)):
                n_ops[0] += 1
                who = inside[-1] if inside else f"op{n_ops[0]}"  # metadata queries (dim, size) don't count
                for t in list(args) + list(kwargs.values()):
                    if isinstance(t, torch.Tensor) and id(t) in produced:
                        readers.setdefault(id(t), set()).add(who)
            return out

    def out_hook(name):
        def h(_m, _i, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                produced[id(out)] = name
        return h

    def bn_pre(name):
        def h(_m, inp):
            keep.append(inp)
            t = inp[0] if inp else None
            if isinstance(t, torch.Tensor) and id(t) in produced:
                pairs.append((produced[id(t)], name, id(t)))
        return h

    def enter(name):
        def h(_m, _i):
            inside.append(name)
        return h

    def leave(_m, _i, _o):
        inside.pop()

    handles = []
    for name, mod in mods.items():
        if name and len(list(mod.children())) == 0:
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave))
        if isinstance(mod, QUANTIZABLE):
            handles.append(mod.register_forward_hook(out_hook(name)))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            handles.append(mod.register_forward_pre_hook(bn_pre(name)))
    try:
        with torch.inference_mode(), CountReads():
            model(example)
    finally:
        for h in handles:
            h.remove()
    folded = []
    seen_bn = set()
    for conv_name, bn_name, tid in pairs:
        if bn_name in seen_bn or readers.get(tid, set()) != {bn_name}:
            continue
        seen_bn.add(bn_name)
        conv, bn = mods[conv_name], mods[bn_name]
        if bn.running_mean is None or not bn.affine and bn.running_var is None:
            continue
        out_ch = conv.weight.shape[0]
        if bn.num_features != out_ch:
            continue
        inv = (bn.running_var + bn.eps).rsqrt()  # (C,)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        factor = gamma * inv  # (C,)
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
        b = conv.bias if conv.bias is not None else torch.zeros(out_ch, dtype=conv.weight.dtype)
        new_b = (b - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_b.to(conv.weight.dtype))
        _set_module(model, bn_name, nn.Identity())
        folded.append(FoldedBN(bn=bn_name, into=conv_name))
    return folded
