"""The AWQ pre-step on a model: find the layers that share an input, search their scales, fold them.

Reference: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024.  The search itself is ``algorithms/awq.py`` (pure); this module is
the part that touches modules:

* ``find_awq_groups``: one forward pass with hooks groups the ``nn.Linear`` layers that are
  called on the very same input tensor (q/k/v, gate/up, a lone down_proj) and finds the module
  whose output channels can absorb 1/s: a norm whose output *is* that tensor ("norm"), the
  ``up_proj`` of a gated MLP whose product with the activated gate is that tensor ("up_proj"),
  or a Linear whose output is that tensor ("linear").  A group is refused, with a reason, when
  folding would change anything else: the predecessor's output is read by another op, a
  module is called more than once, a weight is tied to another module.
* ``fold_awq``: W[:, j] *= s_j for the group's layers, the predecessor's output channel j
  divided by s_j (norm weight and bias, or Linear rows and bias).  The float function is
  unchanged up to float rounding.
* ``apply_awq``: the whole pre-step for ``engine.apply.quantize`` (called after BatchNorm
  folding, before the layer walk, when ``config.awq`` is set): input statistics of every group
  from the float model, the α search with the round-to-nearest grid of the config, the folds,
  and a check that the probe batch's output did not move (one probe for as many folds as
  ``fold_batch_bytes`` of saved weights allow; a batch that moved it is undone and refolded
  group by group, so that only the offending groups are skipped).

Statistics: each group's input X (m, N0) gives F = XᵀX and the per-channel mean |x| (the
paper's activation magnitude), accumulated over the calibration batches in forward passes of
the float model that stop after the last group they serve; as many groups share one pass as fit
in ``max_stat_bytes``.  As in the paper, the search sees float inputs only (X̃ = X: H = G = F),
and the inputs of one group do not depend on the folds of the others (each fold keeps the
function), so the statistics are taken before any fold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from specquant.algorithms.awq import awq_scales, search_quantizer
from specquant.algorithms.base import LayerStats, QuantConfig
from specquant.engine.walk import leaf_stack_hooks, model_output, parameter_holders

GROUP_KINDS = ("norm", "up_proj", "linear")  # where a group's 1/s is folded
MUL_OPS = ("mul", "__mul__", "__rmul__", "multiply")  # the product of a gated MLP, as torch functions
DEFAULT_STAT_BYTES = 1 << 30  # F matrices held at once by one statistics pass (float64)


@dataclass
class AWQGroup:
    """Linear layers that read the same input tensor, and where their scales can be folded."""

    layers: list[str]  # the Linear layers (names, in call order) reading one input tensor
    predecessor: str | None  # the module whose output channels absorb 1/s; None when there is none
    kind: str | None  # "norm" | "up_proj" | "linear"; None when the group cannot be folded
    reason: str | None = None  # why the group cannot be folded (None: it can)

    @property
    def foldable(self) -> bool:
        return self.reason is None


@dataclass
class AWQRecord:
    """What the AWQ pre-step did to one group."""

    layers: list[str]  # the Linear layers sharing the input
    predecessor: str | None  # the module that absorbed 1/s (None when none could)
    kind: str | None  # "norm" | "up_proj" | "linear" (None when none could)
    alpha: float | None  # chosen exponent (0.0: plain rounding was best, nothing folded); None when skipped
    loss_plain: float | None  # Σ_i ‖X w_i − X Q(w_i)‖² with plain rounding (α = 0) on the calibration data
    loss: float | None  # the same with the chosen scales, Q(w_i·s)/s
    rel_error_plain: float | None  # sqrt(loss_plain / Σ_i ‖X w_i‖²): relative output error, plain rounding
    rel_error: float | None  # sqrt(loss / Σ_i ‖X w_i‖²): relative output error with the chosen scales
    folded: bool = False  # whether scales other than 1 were folded into the model
    reason: str | None = None  # why the group was skipped (None when searched)


class _Stop(Exception):
    """Raised by a hook to end a statistics pass after its last group."""


def _is_norm(mod: nn.Module) -> bool:
    """LayerNorm / RMSNorm modules, by type or by a class name ending in "RMSNorm"/"LayerNorm"."""
    rms = getattr(nn, "RMSNorm", ())
    return isinstance(mod, (nn.LayerNorm, rms)) or type(mod).__name__.endswith(("RMSNorm", "LayerNorm"))


def _is_linear(mod: nn.Module) -> bool:
    return type(mod) is nn.Linear  # exact type, as the engine quantizes (walk.QUANTIZABLE)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


# --------------------------------------------------------------------------- finding the groups


@dataclass
class _Probe:
    """What one forward pass with hooks saw."""

    inputs: dict  # id(input tensor) -> Linear layer names called on it, in call order
    order: dict  # Linear layer name -> index of its first call
    produced: dict  # id(tensor) -> name of the norm / Linear that returned it (innermost)
    readers: dict  # id(produced tensor) -> names of the leaf modules / ops that read it
    made_by: dict  # id(op output) -> (op name, ids of the produced tensors among its arguments)
    calls: dict  # module name -> times forward() called it


def _probe(model: nn.Module, example) -> _Probe:
    from torch.overrides import TorchFunctionMode

    mods = dict(model.named_modules())
    p = _Probe(inputs={}, order={}, produced={}, readers={}, made_by={}, calls={})
    inside: list[str] = []  # leaf modules now running: their ops count as one reader
    n_ops = [0]
    keep: list = []  # every tensor seen stays alive during the pass, so ids are never reused

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            keep.append(out)
            if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out
                                                 and isinstance(out[0], torch.Tensor)):
                n_ops[0] += 1
                who = inside[-1] if inside else f"torch op #{n_ops[0]}"  # metadata queries (dim, size) do not count
                flat = [a for arg in list(args) + list(kwargs.values())  # torch.cat([h, ...]) reads h too
                        for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
                read = [id(t) for t in flat if isinstance(t, torch.Tensor) and id(t) in p.produced]
                for t in read:
                    p.readers.setdefault(t, set()).add(who)
                if read and isinstance(out, torch.Tensor):
                    p.made_by[id(out)] = (getattr(func, "__name__", str(func)), read)
            return out

    def count(name):
        def h(_m, _i, out):
            p.calls[name] = p.calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                keep.append(out)
                p.produced.setdefault(id(out), name)  # the innermost producer is hooked first
        return h

    def linear_in(name):
        def h(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                p.order.setdefault(name, len(p.order))
                users = p.inputs.setdefault(id(args[0]), [])
                if name not in users:
                    users.append(name)
        return h

    handles = leaf_stack_hooks(model, inside)
    for name, mod in mods.items():
        if _is_linear(mod):
            handles.append(mod.register_forward_pre_hook(linear_in(name)))
        if name and (_is_linear(mod) or _is_norm(mod)):
            handles.append(mod.register_forward_hook(count(name)))
    try:
        with torch.inference_mode(), Reads():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return p


def find_awq_groups(model: nn.Module, example) -> list[AWQGroup]:
    """The groups of ``nn.Linear`` layers that read one input tensor, in forward order, each with
    the module its scales fold into, or the reason none can take them (read from one forward
    pass on ``example`` with hooks; the model is not changed)."""
    p = _probe(model, example)
    mods = dict(model.named_modules())
    holders = parameter_holders(model)
    groups = []
    for tid, layers in p.inputs.items():
        layers = sorted(layers, key=p.order.__getitem__)
        pred, kind, why = _predecessor(tid, layers, p, mods)
        if why is None:
            why = _unsafe(layers, pred, kind, p, mods, holders)
        groups.append(AWQGroup(layers, pred if why is None else None, kind if why is None else None, why))
    groups.sort(key=lambda g: p.order[g.layers[0]])
    return groups


def _predecessor(tid: int, layers: list[str], p: _Probe, mods: dict) -> tuple[str | None, str | None, str | None]:
    """(predecessor, kind, None), or (None, None, why not) for the input tensor ``tid``."""
    n0 = mods[layers[0]].in_features
    src = p.produced.get(tid)
    if src is not None and _is_norm(mods[src]):
        w, b = getattr(mods[src], "weight", None), getattr(mods[src], "bias", None)
        if not isinstance(w, nn.Parameter) or tuple(w.shape) != (n0,):
            return None, None, f"input is the output of norm '{src}', which has no elementwise weight of size {n0}"
        if b is not None and (not isinstance(b, nn.Parameter) or tuple(b.shape) != (n0,)):
            return None, None, f"input is the output of norm '{src}', whose bias is not of size {n0}"
        return src, "norm", None
    if src is not None and _is_linear(mods[src]):
        if mods[src].out_features != n0:
            return None, None, f"input is the output of '{src}', whose {mods[src].out_features} outputs are not {n0}"
        return src, "linear", None
    if src is not None:
        return None, None, f"input is the output of '{src}' ({type(mods[src]).__name__}), which cannot take the scales"
    # A gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)); channel j of the product scales with
    # up_proj's output row j.
    parent = _parent(layers[0])
    pre = f"{parent}.up_proj" if parent else "up_proj"
    down = f"{parent}.down_proj" if parent else "down_proj"
    if layers == [down] and _is_linear(mods.get(pre)):
        up = mods[pre]
        op = p.made_by.get(tid)
        ups = [t for t, name in p.produced.items() if name == pre]
        if up.out_features != n0:
            return None, None, f"'{pre}' has {up.out_features} outputs, '{down}' reads {n0}"
        if op is None or op[0] not in MUL_OPS or not any(t in op[1] for t in ups):
            return None, None, f"input of '{down}' is not a product with the output of '{pre}'"
        return pre, "up_proj", None
    return None, None, ("input is not the output of a norm, of a gated MLP's up_proj or of a Linear: "
                        "no module to fold the scales into")


def _unsafe(layers: list[str], pred: str, kind: str, p: _Probe, mods: dict, holders: dict) -> str | None:
    """Why folding into ``pred`` would change something besides ``layers``, else None."""
    for name in layers:
        if p.calls.get(name, 0) > 1:
            return f"'{name}' is called more than once by forward()"
    if p.calls.get(pred, 0) > 1:
        return f"'{pred}' is called more than once by forward() (a shared module): folding would change its other uses"
    for t in [t for t, name in p.produced.items() if name == pred]:
        readers = p.readers.get(t, set())
        if kind == "up_proj":  # read once, by the product that is the layer's input
            if len(readers) != 1:
                return f"the output of '{pred}' is read {len(readers)} times: folding would change its other uses"
        elif readers != set(layers):
            others = sorted(readers - set(layers))
            return f"the output of '{pred}' is also read by {', '.join(others[:3])}: folding would change it"
    for name in layers + [pred]:
        mod = mods[name]
        for attr in ("weight", "bias") if name == pred else ("weight",):
            t = getattr(mod, attr, None)
            if not isinstance(t, nn.Parameter):
                continue
            if {id(m) for _, m, _ in holders.get(id(t), [])} - {id(mod)}:
                return f"the {attr} of '{name}' is shared with another module (tied): folding would change it"
    return None


# --------------------------------------------------------------------------- folding


@torch.no_grad()
def fold_awq(model: nn.Module, layers: list[str], scale: torch.Tensor, predecessor: str) -> None:
    """Fold the AWQ scales ``scale`` (N0,) in place: each of ``layers`` (Linear, weight (out, N0))
    gets W[:, j] *= s_j, and ``predecessor``'s output channel j is divided by s_j: a norm's
    elementwise weight (and bias), or a Linear's row j (and bias entry j).  The float function is
    unchanged (up to rounding) when ``predecessor``'s output, channel by channel, is the layers'
    input, which ``find_awq_groups`` checks."""
    mods = dict(model.named_modules())
    pred = mods[predecessor]
    for name in layers:
        w = mods[name].weight  # (out, N0)
        w.mul_(scale.to(w.device, w.dtype)[None, :])
    w = pred.weight
    if w.dim() == 2:  # a Linear: rows are output channels
        w.div_(scale.to(w.device, w.dtype)[:, None])
    else:  # a norm: one weight per channel
        w.div_(scale.to(w.device, w.dtype))
    b = getattr(pred, "bias", None)
    if isinstance(b, torch.Tensor):
        b.div_(scale.to(b.device, b.dtype))


# --------------------------------------------------------------------------- the pre-step


@dataclass
class _Acc:
    """Running statistics of one group's input."""

    F: torch.Tensor  # (N0, N0) float64: XᵀX
    abs_sum: torch.Tensor  # (N0,) float64: Σ |x|
    sum: torch.Tensor  # (N0,) float64: Σ x
    n: int = 0  # rows accumulated

    def add(self, x: torch.Tensor) -> None:
        X = x.reshape(-1, x.shape[-1]).float()  # (m, N0)
        self.F += (X.T @ X).double()
        self.abs_sum += X.abs().sum(0).double()
        self.sum += X.sum(0).double()
        self.n += X.shape[0]

    @classmethod
    def empty(cls, x: torch.Tensor) -> "_Acc":
        """Zero statistics for inputs shaped like ``x`` (…, N0)."""
        n0 = x.shape[-1]
        z = torch.zeros(n0, dtype=torch.float64, device=x.device)
        return cls(F=torch.zeros(n0, n0, dtype=torch.float64, device=x.device), abs_sum=z, sum=z.clone())


def capture_group_inputs(model: nn.Module, groups: list[AWQGroup], batches, new_acc=_Acc.empty) -> list:
    """One pass over ``batches``, stopped after the last of ``groups`` (in forward order): the
    statistics of each group's input, accumulated by ``new_acc(first input)`` (an object with
    ``add(x)``; default: AWQ's F = XᵀX, Σ|x| and Σx)."""
    mods = dict(model.named_modules())
    accs: list = [None] * len(groups)
    handles = []
    for k, g in enumerate(groups):
        def pre(_m, args, k=k):
            x = args[0]
            if accs[k] is None:
                accs[k] = new_acc(x)
            accs[k].add(x)
            if k == len(groups) - 1:
                raise _Stop
        handles.append(mods[g.layers[0]].register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    continue
                raise RuntimeError(f"AWQ: layer '{groups[-1].layers[0]}' was not called by forward()")
    finally:
        for h in handles:
            h.remove()
    return accs


def cut_by_bytes(sizes: list[int], budget: int) -> list[list[int]]:
    """Positions 0 … len(sizes) − 1 cut into consecutive runs whose sizes sum to at most ``budget``
    (a run holds at least one position)."""
    out, cur, used = [], [], 0
    for k, size in enumerate(sizes):
        if cur and used + size > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += size
    return out + ([cur] if cur else [])


def _chunks(groups: list[AWQGroup], mods: dict, budget: int) -> list[list[AWQGroup]]:
    """Consecutive groups whose F matrices (N0² float64 each) fit in ``budget`` bytes together."""
    runs = cut_by_bytes([8 * mods[g.layers[0]].in_features ** 2 for g in groups], budget)
    return [[groups[k] for k in run] for run in runs]


def probe_output(model: nn.Module, example) -> torch.Tensor | None:
    with torch.inference_mode():
        y = model_output(model(example))
    return None if y is None else y.detach().double().clone()


def _moved(y0: torch.Tensor | None, y1: torch.Tensor | None, dtype: torch.dtype) -> float:
    """max |y1 − y0| / max |y0| (0 when there is nothing to compare)."""
    if y0 is None or y1 is None or y0.shape != y1.shape:
        return 0.0 if y0 is None and y1 is None else math.inf
    den = float(y0.abs().max()) if y0.numel() else 0.0
    num = float((y1 - y0).abs().max()) if y0.numel() else 0.0
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def output_moved(y0: torch.Tensor | None, y1: torch.Tensor | None, dtype: torch.dtype) -> float | None:
    """How far (relative) the probe output moved from ``y0`` to ``y1`` when that is more than float
    rounding (a changed function); None when it is within rounding."""
    moved = _moved(y0, y1, dtype)
    return moved if moved > _tolerance(dtype) else None


def _tolerance(dtype: torch.dtype) -> float:
    """How far one fold may move the probe output, relative: rounding, not a changed function."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


PROBE_TOKENS = 32  # tokens of the probe sequence for token-id inputs (the groups do not depend on length)


def probe_example(model: nn.Module, example):
    """A small stand-in for ``example`` with the same graph: for token ids (an integer (B, T) tensor)
    the first ``PROBE_TOKENS`` tokens of the first sequence, when the model runs on them; anything
    else unchanged.  The group probe keeps every intermediate tensor of its pass alive (so that no
    id is reused), and the fold checks run the model once per batch of folds: on smollm2-135m with
    2 × 512 tokens that pass held several GB, with 32 tokens a few MB."""
    if not (isinstance(example, torch.Tensor) and example.dim() == 2 and not example.is_floating_point()
            and not example.is_complex() and example.shape[1] > PROBE_TOKENS):
        return example
    short = example[:1, :PROBE_TOKENS]
    try:
        with torch.inference_mode():
            model(short)
    except Exception:  # noqa: BLE001 - a model that needs its full length keeps it
        return example
    return short


def groups_on_data(model: nn.Module, batches, example, what: str) -> tuple[torch.Tensor, dict, list]:
    """The start of a fold pre-step (AWQ, SmoothQuant): calibration data required (one line naming
    ``what`` otherwise), the probe batch (default: the first two samples; for token ids a short
    prefix of the first, ``probe_example``), the model's modules by name and its groups of Linear
    layers sharing an input (``find_awq_groups``)."""
    if batches is None or len(batches) == 0:
        raise ValueError(f"{what} needs calibration data (calib=...), got none")
    if example is None:
        example = batches[0][:2]
    example = probe_example(model, example)
    return example, dict(model.named_modules()), find_awq_groups(model, example)


def apply_awq(model: nn.Module, config: QuantConfig, batches, example=None, *,
              max_stat_bytes: int = DEFAULT_STAT_BYTES,
              fold_batch_bytes: int = DEFAULT_STAT_BYTES) -> list[AWQRecord]:
    """Search and fold AWQ scales into ``model`` in place (float function unchanged); one record
    per group of Linear layers sharing an input, in forward order.

    Args:
        model: the float model, in eval mode (BatchNorm already folded, nothing quantized yet).
        config: the method's config: ``awq_grid`` exponents are searched; the loss rounds each
            layer at its own ``config.settings_for(name)`` bits and granularity on the config's
            grid (``algorithms.awq.search_quantizer``); layers the config leaves in float are
            scaled with their group but not counted in the loss.
        batches: calibration inputs (a list of tensors, as ``calibrate.as_batches`` gives).
        example: the probe batch (default: the first two samples of the first batch); its output
            is checked after every fold, and a fold that moves it more than rounding does is
            undone (the group is then skipped with the reason).
        max_stat_bytes: memory for the N0×N0 statistics held at once (more groups: more passes).
        fold_batch_bytes: memory for the copies of the weights that a batch of folds changes (kept to
            undo the batch exactly); the folds of a batch are checked with one probe (more batches:
            more probes, same result).
    """
    example, mods, groups = groups_on_data(model, batches, example, "AWQ (config.awq)")
    records: dict[int, AWQRecord] = {}
    todo = []
    for i, g in enumerate(groups):
        quantized = [n for n in g.layers if not config.settings_for(n).skip]
        reason = g.reason
        if reason is None and not quantized:
            reason = "every layer of the group is left in float by the configuration"
        if reason is not None:
            records[i] = AWQRecord(g.layers, None, None, None, None, None, None, None, reason=reason)
        else:
            todo.append(i)
    y_prev = probe_output(model, example) if todo else None
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    for chunk in _chunks([groups[i] for i in todo], mods, max_stat_bytes):
        ids = todo[:len(chunk)]
        todo = todo[len(chunk):]
        found = []  # (index, group, scale) of the groups whose search chose scales other than 1
        for i, g, acc in zip(ids, chunk, capture_group_inputs(model, chunk, batches)):
            records[i], scale = _search(mods, config, g, acc)
            if scale is not None:
                found.append((i, g, scale))
        y_prev = _fold_all(model, mods, found, records, example, y_prev, dtype, fold_batch_bytes)
    return [records[i] for i in range(len(groups))]


def touched_by_fold(mods: dict, g: AWQGroup) -> list[torch.Tensor]:
    """The tensors a fold into group ``g`` changes: its layers' weights, its predecessor's weight and bias."""
    pred = mods[g.predecessor]
    return [mods[n].weight for n in g.layers] + [t for t in (pred.weight, getattr(pred, "bias", None))
                                                 if isinstance(t, torch.Tensor)]


def fold_all_checked(model: nn.Module, mods: dict, items: list, example, y_prev, dtype,
                     budget: int) -> tuple[list[str | None], torch.Tensor | None]:
    """Run the folds of ``items`` ((group, fold) pairs in forward order; ``fold()`` folds its group in
    place and may read the weights as earlier folds left them), as many at once as the copies of
    their touched tensors fit in ``budget`` bytes, with one probe per batch: every fold keeps the
    function, so the output must not move.  When it does, the batch is undone exactly and run again
    fold by fold, each checked (``fold_checked``), so that only the offending folds are undone.
    Returns (per item None when folded, else why not; the last probe output).  The result equals
    folding and checking one group at a time; the model runs once per batch instead of once per
    group (on smollm2-135m: 1 probe instead of 90)."""
    reasons: list[str | None] = [None] * len(items)
    sizes = [sum(t.numel() * t.element_size() for t in touched_by_fold(mods, g)) for g, _ in items]
    for batch in cut_by_bytes(sizes, budget):
        touched = [t for k in batch for t in touched_by_fold(mods, items[k][0])]
        saved = [t.detach().clone() for t in touched]
        for k in batch:
            items[k][1]()
        y = probe_output(model, example)
        if output_moved(y_prev, y, dtype) is None:
            y_prev = y
            continue
        with torch.no_grad():
            for t, old in zip(touched, saved):  # undo the whole batch, exactly
                t.copy_(old)
        del saved
        for k in batch:
            reasons[k], y_prev = fold_checked(model, items[k][0], items[k][1], example, y_prev, dtype)
    return reasons, y_prev


def _fold_all(model, mods, found: list, records: dict, example, y_prev, dtype, budget: int):
    """Fold the searched scales of ``found`` (index, group, scale) with ``fold_all_checked``; a fold that
    moved the output leaves its record without scales, with the reason."""
    items = [(g, lambda g=g, scale=scale: fold_awq(model, g.layers, scale, g.predecessor)) for _, g, scale in found]
    reasons, y_prev = fold_all_checked(model, mods, items, example, y_prev, dtype, budget)
    for (i, _, _), why in zip(found, reasons):
        rec = records[i]
        if why is None:
            rec.folded = True
        else:
            rec.alpha = rec.loss = rec.rel_error = None
            rec.reason = why
    return y_prev


def _search(mods, config, g: AWQGroup, acc: _Acc):
    """The α search for one group: (record, scale to fold), the scale None when nothing is to be
    folded (α = 0 chosen, or statistics not finite)."""
    if not bool(torch.isfinite(acc.F.diagonal()).all()):
        return AWQRecord(g.layers, None, None, None, None, None, None, None,
                         reason="its input statistics are not finite on the calibration data"), None
    n = max(acc.n, 1)
    mean = acc.sum / n
    stats = LayerStats(H=acc.F, G=acc.F, F=acc.F, n_rows=acc.n, mean_x=mean, mean_xt=mean)  # float inputs: X̃ = X
    names = [n_ for n_ in g.layers if not config.settings_for(n_).skip]
    Ws, quants = [], []
    for name in names:
        s = config.settings_for(name)
        Ws.append(mods[name].weight.detach().to(acc.F.device))  # (out_i, N0)
        quants.append(search_quantizer(config, s.bits, s.granularity))
    try:
        res = awq_scales(Ws, stats, quants, config.awq_grid, act_scale=acc.abs_sum / n)
    except ValueError as e:
        raise ValueError(f"AWQ on {', '.join(repr(x) for x in names)}: {str(e).splitlines()[0]}") from None
    energy = float(sum(stats.target_energy(W.float()).sum() for W in Ws))

    def rel(loss: float) -> float:
        return math.sqrt(max(loss, 0.0) / energy) if energy > 0 else (0.0 if loss <= 0 else math.inf)

    rec = AWQRecord(g.layers, g.predecessor, g.kind, res.alpha, res.loss_plain, res.loss, rel(res.loss_plain),
                    rel(res.loss))
    return rec, (None if res.alpha == 0.0 else res.scale)


def fold_checked(model: nn.Module, g: AWQGroup, fold, example, y_prev, dtype):
    """Run ``fold()`` (it folds scales into group ``g`` in place) and check the probe output ``y_prev``
    did not move beyond rounding; (None, new output), or (why, y_prev) with the fold undone exactly."""
    touched = touched_by_fold(dict(model.named_modules()), g)
    saved = [t.detach().clone() for t in touched]
    fold()
    y = probe_output(model, example)
    moved = output_moved(y_prev, y, dtype)
    if moved is not None:
        with torch.no_grad():
            for t, old in zip(touched, saved):  # undo, exactly
                t.copy_(old)
        return (f"folding into '{g.predecessor}' moved the model's output by {moved:.2g} (relative): "
                "it does not scale its output channel by channel; undone"), y_prev
    return None, y
