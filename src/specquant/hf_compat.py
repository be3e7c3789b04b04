"""transformers layers that specquant handles through their plain-torch equivalent.

GPT-2-style models (GPT-2, DistilGPT2, GPT-Neo's MLP in older versions, ...) store their
projections as transformers' ``Conv1D``: ``y = x @ W + b`` with ``W`` stored (in, out).  It is
an ``nn.Linear`` with the weight transposed.  The engine turns such modules into ``nn.Linear``
before it walks a model (so they are quantized, packed, saved and loaded like any Linear layer),
and the loader does the same to the architecture it builds, so that a saved file's layers find
their modules.  Nothing here imports transformers or any other part of specquant.
"""
from __future__ import annotations

import torch
from torch import nn


def is_hf_conv1d(mod: nn.Module) -> bool:
    """Whether ``mod`` is transformers' ``Conv1D`` (recognised by class and module name)."""
    return (type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() == 2)


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` inside ``model`` by the ``nn.Linear`` that computes the
    same function (weight transposed to (out, in), same bias), in place; returns the names replaced.

    Parameter names do not change (``<name>.weight``, ``<name>.bias``), only the weight's
    orientation.  A module that shares its weight with another module is refused (a transposed
    copy would break the tie).
    """
    names = [n for n, m in model.named_modules() if n and is_hf_conv1d(m)]
    if not names:
        return []
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    for name in names:
        mod = model.get_submodule(name)
        if len(set(owners.get(id(mod.weight), []))) > 1:
            raise ValueError(f"layer '{name}': a Conv1D whose weight is shared with "
                             f"{', '.join(sorted(set(owners[id(mod.weight)]) - {name}))} cannot be turned "
                             f"into a Linear layer")
        w = mod.weight.detach()  # (in, out)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())  # (out, in)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.detach())  # (out,)
        lin.train(mod.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return names
