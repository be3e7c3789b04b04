"""Find the quantizable layers of a model, in forward order, and fold BatchNorm into convs.

Both use hooks on one real forward pass (no tracing), so any ``forward()`` works: residual
networks, transformer blocks, functional glue between modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Exactly these types are quantized: a subclass may read its weight outside forward() (as
# nn.MultiheadAttention does with its NonDynamicallyQuantizableLinear out_proj) or use it
# differently, so a packed replacement could not stand in for it.
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


@dataclass
class TiedWeights:
    """What the engine does with layers whose weight Parameter other modules also hold."""

    layer_order: list[str]  # layers to quantize, in the given order: one per shared weight
    followers: dict[str, list[str]] = field(default_factory=dict)  # quantized layer -> layers sharing its weight
    reasons: dict[str, str] = field(default_factory=dict)  # layer left out because of a tie -> why


def is_quantizable(mod: nn.Module) -> bool:
    """Whether the engine quantizes ``mod``: its type is exactly Linear, Conv1d or Conv2d."""
    return type(mod) in QUANTIZABLE


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv1d / Conv2d (exact types, subclasses left out), in
    registration order; a module registered under several names appears once, under its first."""
    return [(n, m) for n, m in model.named_modules() if is_quantizable(m)]


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(Parameter) -> every (module name, module, attribute) that holds it directly.

    Duplicates are kept: a module registered under two names is listed under both, and a
    Parameter shared by two modules (tied weights) under each of them."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append((mname, mod, pname))
    return holders


def _distinct_holders(holders: list[tuple[str, nn.Module, str]]) -> list[tuple[str, nn.Module, str]]:
    """One entry per module object (its first name), in registration order."""
    seen: set[int] = set()
    out = []
    for entry in holders:
        if id(entry[1]) not in seen:
            seen.add(id(entry[1]))
            out.append(entry)
    return out


def shared_weight(holders: dict[int, list], mod: nn.Module) -> bool:
    """Whether a module other than ``mod`` (itself under another name does not count) holds its weight."""
    return len(_distinct_holders(holders.get(id(mod.weight), []))) > 1


def _label(name: str, mod: nn.Module) -> str:
    return f"'{name}' ({type(mod).__name__})" if name else f"the top-level module ({type(mod).__name__})"


def resolve_ties(model: nn.Module, layer_order: list[str], excluded: Callable[[str], bool]) -> TiedWeights:
    """Quantize each shared weight once, or not at all.

    ``order``: the layers the engine would quantize, in forward order; ``excluded(name)``: the
    configuration leaves that layer in float.  A weight held by several modules is quantized at
    its first holder in ``order`` when every holder is a quantizable layer holding it as its
    ``weight`` and not excluded; the other holders become that layer's followers (same Parameter,
    same ``qweight``).  When some holder is not quantized (an Embedding with tied input/output
    embeddings, an excluded layer, a subclass), no holder is: they all stay in float.
    """
    holders = parameter_holders(model)
    mods = dict(model.named_modules())
    ties = TiedWeights(layer_order=[])
    done: set[int] = set()  # ids of shared weights already resolved
    for name in layer_order:
        w = mods[name].weight
        if id(w) in done:
            continue
        others = [h for h in _distinct_holders(holders.get(id(w), [])) if h[1] is not mods[name]]
        if not others:
            ties.layer_order.append(name)
            continue
        done.add(id(w))
        blockers = [(n, m) for n, m, attr in others if not (is_quantizable(m) and attr == "weight" and not excluded(n))]
        if blockers:
            why = f"weight tied to {_label(*blockers[0])}, which is not quantized: kept in float to keep the tie"
            for n, m, attr in [(name, mods[name], "weight")] + others:
                if is_quantizable(m) and attr == "weight" and (n, m) not in blockers:
                    ties.reasons[n] = why
            continue
        ties.layer_order.append(name)
        ties.followers[name] = [n for n, _, _ in others]
        for n, _, _ in others:
            ties.reasons[n] = f"weight tied to '{name}': quantized once there, tie kept"
    return ties


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the quantizable layers in the order the forward pass first calls them.

    Layers never called by ``forward`` are left out.
    """
    layer_order: list[str] = []
    handles = []
    for name, mod in quantizable_layers(model):
        def hook(_m, _inp, name=name):
            if name not in layer_order:
                layer_order.append(name)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return layer_order


def skipped_modules(model: nn.Module, quantized: set[str], folded: set[str],
                    reasons: dict[str, str] | None = None) -> list[SkippedModule]:
    """Modules that own parameters but are not quantized, with the reason.

    ``reasons`` gives the reason for particular modules (tied weights); a module registered
    under a second name is listed under that name too, pointing to its first."""
    reasons = reasons or {}
    first: dict[int, str] = {}  # id(module) -> its first name
    out = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in first:
            if name and any(True for _ in mod.parameters(recurse=False)):
                done = "quantized once there" if first[id(mod)] in quantized else "treated as there"
                out.append(SkippedModule(name, type(mod).__name__,
                                         f"same module as '{first[id(mod)]}', registered under a second name: {done}"))
            continue
        first[id(mod)] = name
        if name in quantized or name in folded or name == "":
            continue
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        base = next((t for t in QUANTIZABLE if isinstance(mod, t)), None)
        if name in reasons:
            reason = reasons[name]
        elif base is not None and type(mod) is not base:
            reason = (f"{type(mod).__name__} is a subclass of {base.__name__} whose weight may be used "
                      "outside its forward(): kept in float")
        elif base is not None:
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


def model_output(out) -> torch.Tensor | None:
    """A model's main output: the tensor itself, a Hugging Face output's ``.logits``, or the first
    tensor inside a tuple / list / dict (searched in order); None when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in items:
        t = model_output(v)
        if t is not None:
            return t
    return None


def leaf_stack_hooks(model: nn.Module, inside: list[str]) -> list:
    """Hooks that keep ``inside`` the stack of leaf modules now running (innermost last), so that a
    traced torch op can be charged to the module that runs it; returns the handles to remove."""
    def enter(name):
        def h(_m, _i):
            inside.append(name)
        return h

    def leave(_m, _i, _o):
        inside.pop()

    handles = []
    for name, mod in model.named_modules():
        if name and len(list(mod.children())) == 0:
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave))
    return handles


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[FoldedBN]:
    """Fold each BatchNorm whose input is exactly the output of a conv/linear into it.

    The pairing is read from one forward pass: a BN is folded when the tensor it receives is
    the very tensor a conv/linear returned and nothing else reads that tensor.  The BN is
    replaced by ``nn.Identity`` and the producer gains the affine map (a bias if it had none).
    A producer whose weight another module also holds (tied weights), or a producer or BN that
    forward() calls more than once, is left alone: folding would change its other uses too.
    Must be called in eval mode (running statistics are used).
    """
    from torch.overrides import TorchFunctionMode

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []  # nothing to fold: skip the traced pass (it keeps every intermediate tensor alive)
    mods = dict(model.named_modules())
    produced: dict[int, str] = {}  # id of a conv/linear output -> producer name
    readers: dict[int, set] = {}  # id of a produced tensor -> who computed a tensor from it
    inside: list[str] = []  # stack of leaf modules now running (their ops count as one reader)
    n_ops = [0]
    pairs: list[tuple[str, str, int]] = []
    calls: dict[str, int] = {}  # producer / BatchNorm name -> times forward() called it
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
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                keep.append(out)
                produced[id(out)] = name
        return h

    def bn_pre(name):
        def h(_m, inp):
            calls[name] = calls.get(name, 0) + 1
            keep.append(inp)
            t = inp[0] if inp else None
            if isinstance(t, torch.Tensor) and id(t) in produced:
                pairs.append((produced[id(t)], name, id(t)))
        return h

    handles = leaf_stack_hooks(model, inside)
    for name, mod in mods.items():
        if is_quantizable(mod):
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
    holders = parameter_holders(model)
    for conv_name, bn_name, tid in pairs:
        if bn_name in seen_bn or readers.get(tid, set()) != {bn_name}:
            continue
        seen_bn.add(bn_name)
        conv, bn = mods[conv_name], mods[bn_name]
        if calls.get(conv_name, 0) > 1 or calls.get(bn_name, 0) > 1 or shared_weight(holders, conv):
            continue
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
        identity = nn.Identity()
        for alias, m in list(model.named_modules(remove_duplicate=False)):  # every name the BN is registered under
            if m is bn:
                _set_module(model, alias, identity)
        folded.append(FoldedBN(bn=bn_name, into=conv_name))
    return folded
