"""Sequential calibration: stream the statistics of each layer's float and quantized inputs.

The model is cut into *blocks*: the top-level children that hold quantizable layers, with
``nn.Sequential`` / ``nn.ModuleList`` containers split into their children (residual
blocks, transformer blocks, single layers).  For each block the engine caches the block's
inputs in the float model and in the partly quantized model once (a forward pass that stops
at the block), then quantizes the block's layers one after another, re-running only the
block on the cached inputs.  The whole network is thus never re-run for every layer.

Statistics are the N0×N0 products H = X̃ᵀX̃, G = X̃ᵀX (and F = XᵀX on request, else only the
float output energy ‖X w_i‖² per channel) in ``LayerStats``, so memory does not grow with the
number of calibration samples.  Conv inputs are unfolded into
patches with the layer's real stride, padding and dilation; per group for grouped convs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from specquant.algorithms.base import LayerStats
from specquant.engine.treesum import DyadicSum, total
from specquant.engine.walk import QUANTIZABLE


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class StreamOptions:
    """How layer inputs are streamed into statistics."""

    batch_size: int = 128  # calibration samples per forward pass
    patch_fraction: float = 1.0  # share of conv patches kept (random, seeded), as in the SPFQ code
    seed: int = 0  # seed of the patch subsampling
    chunk: int = 32  # samples unfolded into patches at a time (memory only; results are the same)
    first_batch: int = 0  # index of the first streamed batch in the whole calibration set (a rank's shard start)
    combine: Callable | None = None  # distributed runs: this rank's dyadic nodes -> all ranks' (engine/distributed.py)


def _token_batch(batch: Mapping, where: str) -> torch.Tensor:
    """``input_ids`` of a tokenizer's batch (a dict or ``BatchEncoding``); padding is refused."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{where}: a dict calibration batch needs an 'input_ids' tensor "
                         f"(keys: {', '.join(map(str, batch)) or 'none'})")
    extra = sorted(k for k in batch if k not in ("input_ids", "attention_mask", "token_type_ids"))
    if extra:
        raise ValueError(f"{where}: calibration batch keys {extra} are not supported (input_ids and an "
                         f"all-ones attention_mask are)")
    mask = batch.get("attention_mask")
    if mask is not None and not bool((torch.as_tensor(mask) == 1).all()):
        raise ValueError(f"{where}: the attention_mask pads some sequences; give unpadded windows of equal "
                         f"length (e.g. specquant.eval.perplexity.calibration_windows)")
    return ids


def as_batches(calib, batch_size: int) -> list[torch.Tensor]:
    """Normalise calibration data to a list of input tensors.

    Accepts a tensor (N, …), a list/iterable of tensors, of (x, y, …) tuples (a DataLoader), or of
    tokenizer batches (dicts / ``BatchEncoding`` with ``input_ids`` and an all-ones
    ``attention_mask``; their ``input_ids`` are the inputs), or one such dict.
    """
    if calib is None:
        raise ValueError("this method needs calibration data (calib=...), got None")
    if isinstance(calib, Mapping):
        calib = [calib]
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or calib.shape[0] == 0:
            raise ValueError(f"the calibration set is empty (tensor of shape {tuple(calib.shape)})")
        return list(calib.split(batch_size))
    out = []
    for i, item in enumerate(calib if isinstance(calib, Iterable) else [calib]):
        x = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(x, Mapping):
            x = _token_batch(x, f"calibration batch {i}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calibration batches must be tensors or tokenizer dicts, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            continue
        out.extend(x.split(batch_size))
    if not out:
        raise ValueError("the calibration set is empty (no samples in the given batches)")
    return out


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, cheaply: NaN and inf propagate through one sum, and
    only when that sum is not finite (it may also overflow on large finite values) is ``x``
    checked entry by entry."""
    if not torch.is_floating_point(x) or x.numel() == 0:
        return True
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def _bad_rows(x: torch.Tensor) -> tuple[int, int, int]:
    """(first index along dim 0 holding a NaN/inf, number of NaN, number of inf) of ``x``."""
    bad = ~torch.isfinite(x)
    first = int(torch.nonzero(bad.reshape(x.shape[0], -1).any(1))[0]) if x.dim() else 0
    n_nan = int(torch.isnan(x).sum())
    return first, n_nan, int(bad.sum()) - n_nan


def batch_starts(batches: list[torch.Tensor]) -> list[int]:
    """Index of each batch's first sample in the calibration set, and the total at the end."""
    starts = [0]
    for b in batches:
        starts.append(starts[-1] + b.shape[0])
    return starts


def check_calibration_finite(batches: list[torch.Tensor]) -> None:
    """Raise a one-line ValueError naming the first calibration sample that holds NaN/inf."""
    starts = batch_starts(batches)
    for i, x in enumerate(batches):
        if not all_finite(x):
            s, n_nan, n_inf = _bad_rows(x)
            raise ValueError(f"calibration input has NaN/inf at sample {starts[i] + s} (batch {i}): "
                             f"{n_nan} NaN and {n_inf} inf values in that batch; fix or drop those samples")


def _check_layer_input(x: torch.Tensor, name: str, i: int, quantized: bool, starts: list[int] | None) -> None:
    """Raise naming the layer, batch and sample when the layer's input ``x`` holds NaN/inf."""
    if all_finite(x):
        return
    s, n_nan, n_inf = _bad_rows(x)
    where = f"batch {i}, index {s} along dim 0 of its {tuple(x.shape)} input"
    if starts is not None and i + 1 < len(starts) and x.shape[0] == starts[i + 1] - starts[i]:
        where = f"sample {starts[i] + s} (batch {i})"
    if quantized:
        cause = "the layers quantized before it make the activations overflow"
    else:
        cause = "the float model itself produces non-finite activations on this finite data"
    raise ValueError(f"layer '{name}': its input in the {'partly quantized' if quantized else 'float'} model "
                     f"has NaN/inf at {where} ({n_nan} NaN, {n_inf} inf): {cause}")


def layer_cols(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as a (groups, N0, m) matrix of columns (one per row of X), so that
    out = colsᵀ @ Wᵀ per group.  Conv patches keep im2col's layout (positions contiguous), which
    makes the one copy cheap and the products XᵀX plain GEMMs."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # (1, in, m), a view
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if isinstance(mod.padding, str):
            raise ValueError(f"string padding {mod.padding!r} is not supported for calibration")
        if mod.padding_mode != "zeros":
            x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
            pad = 0
        else:
            pad = mod.padding
        if isinstance(mod, nn.Conv1d):
            x = x.unsqueeze(-1)
            ks, st, dl = (mod.kernel_size[0], 1), (mod.stride[0], 1), (mod.dilation[0], 1)
            pd = (pad[0], 0) if not isinstance(pad, int) else (pad, 0)
        else:
            ks, st, dl, pd = mod.kernel_size, mod.stride, mod.dilation, pad
        cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st)  # (B, C·kh·kw, L)
        g = mod.groups
        B, CK, L = cols.shape
        cols = cols.reshape(B, g, CK // g, L).permute(1, 2, 0, 3)  # (g, C/g·kh·kw, B, L)
        return cols.reshape(g, CK // g, B * L)
    raise TypeError(f"not a quantizable layer: {type(mod).__name__}")


def layer_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as a (groups, m, N0) matrix of rows, so that out = rows @ Wᵀ per group
    (a transposed view of ``layer_cols``)."""
    return layer_cols(mod, x).transpose(1, 2)


class StatsAccumulator:
    """Running H, G, means and output energies for one layer (per conv group).

    ``weight`` (g, out/g, N0), when given, makes the accumulator also sum the float output
    energy ‖X w_i‖² per output channel, which is all the error report needs of F = XᵀX; F itself
    is then only kept when ``keep_f`` is set (or comes free, when X̃ = X): skipping it saves a
    third of the products.
    """

    def __init__(self, groups: int, dim: int, weight: torch.Tensor | None = None, keep_f: bool = True,
                 device: torch.device | str | None = None, first_batch: int = 0):
        z = torch.zeros(groups, dim, dim, dtype=torch.float64, device=device)
        self.H, self.G = z.clone(), z.clone()
        self.F = z.clone() if keep_f else None
        self.weight = None if weight is None else weight.float()  # (g, out/g, N0)
        self.energy = None if weight is None else torch.zeros(groups, weight.shape[1], dtype=torch.float64,
                                                              device=device)
        self.same = True  # every chunk so far had X̃ = X (then F = H)
        self.sx = torch.zeros(groups, dim, dtype=torch.float64, device=device)
        self.sxt = torch.zeros(groups, dim, dtype=torch.float64, device=device)
        self.n = 0
        self.sums = DyadicSum()  # the closed batches' sums as dyadic nodes (engine/treesum.py)
        self.next_batch = first_batch  # index of the batch being added, in the whole calibration set
        self.open = False  # add() was called since the last close_batch()

    def add(self, X: torch.Tensor, Xt: torch.Tensor) -> None:
        """X, Xt: (g, m, N0) float rows from the float and the quantized model (views of
        column-major ``layer_cols`` are the fast layout)."""
        Xc = X.transpose(1, 2).float()  # (g, N0, m)
        same = Xt is X
        Xtc = Xc if same else Xt.transpose(1, 2).float()
        self.same = self.same and same
        if same:  # first layer, or same inputs: one product serves all three
            xx = (Xc @ Xc.transpose(1, 2)).double()  # (g, N0, N0)
            self.H += xx
            self.G += xx
            if self.F is not None:
                self.F += xx
        else:
            self.H += (Xtc @ Xtc.transpose(1, 2)).double()
            self.G += (Xtc @ Xc.transpose(1, 2)).double()
            if self.F is not None:
                self.F += (Xc @ Xc.transpose(1, 2)).double()
        if self.weight is not None:
            self.energy += (self.weight @ Xc).double().pow(2).sum(-1)  # (g, out/g)
        self.sx += Xc.sum(2).double()
        self.sxt += Xtc.sum(2).double()
        self.n += Xc.shape[2]
        self.open = True

    def _parts(self) -> list[torch.Tensor]:
        """The running sums as one list (the dyadic sum's parts): H, G, [F], [energy], sx, sxt, n."""
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.H.device)
        return [t for t in (self.H, self.G, self.F, self.energy, self.sx, self.sxt, n) if t is not None]

    def _set_parts(self, parts: list[torch.Tensor]) -> None:
        it = iter(parts)
        self.H, self.G = next(it), next(it)
        self.F = next(it) if self.F is not None else None
        self.energy = next(it) if self.energy is not None else None
        self.sx, self.sxt = next(it), next(it)
        self.n = int(next(it).item())

    def close_batch(self) -> None:
        """End this calibration batch: its sums become leaf ``next_batch`` of the dyadic sum (the one
        summation order of every run, single-process or distributed) and the running sums restart."""
        if not self.open:
            return
        self.sums.push(self.next_batch, self._parts())
        self.next_batch += 1
        self._set_parts([torch.zeros_like(t) for t in self._parts()])
        self.open = False

    def finish(self, combine=None) -> None:
        """Replace the running sums by the total over every closed batch, summed in the dyadic order;
        ``combine`` (distributed runs, engine/distributed.py) maps this stream's nodes to the nodes of
        every rank's shard."""
        self.close_batch()
        nodes = self.sums.nodes if combine is None else combine(self.sums.nodes)
        self._set_parts(total(nodes))
        self.sums = DyadicSum()

    def first_nonfinite(self, full: bool = True) -> str | None:
        """The first statistic that is not finite (float32 overflow of the products), else None.

        ``full=False`` checks only the diagonals of the N0×N0 products (and the vectors): O(N0),
        cheap enough for every batch; an off-diagonal entry is bounded by its diagonal ones."""
        def part(t):
            return t if full or t is None else torch.diagonal(t, dim1=1, dim2=2)

        named = (("H = X̃ᵀX̃", part(self.H)), ("G = X̃ᵀX", part(self.G)), ("F = XᵀX", part(self.F)),
                 ("the output energies ‖X w_i‖²", self.energy), ("the input sums", self.sx),
                 ("the input sums", self.sxt))
        return next((k for k, t in named if t is not None and not all_finite(t)), None)

    def stats(self) -> list[LayerStats]:
        """The statistics over every batch added (``finish`` first when batches were closed)."""
        if self.sums.nodes:
            self.finish()
        n = max(self.n, 1)
        F = self.F if self.F is not None else (self.H if self.same else None)
        return [
            LayerStats(H=self.H[i], G=self.G[i], F=None if F is None else F[i], n_rows=self.n,
                       mean_x=self.sx[i] / n, mean_xt=self.sxt[i] / n,
                       energy=None if self.energy is None else self.energy[i])
            for i in range(self.H.shape[0])
        ]


def _subsample(rows: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    if fraction >= 1.0:
        return rows
    m = rows.shape[1]
    k = max(1, int(round(m * fraction)))
    idx = torch.randperm(m, generator=gen)[:k]  # drawn on the CPU: the same patches on any device
    return rows[:, idx.to(rows.device)]


def find_blocks(model: nn.Module, layer_names: list[str]) -> list[str]:
    """Block names in forward order: top-level children holding layers, containers split.

    A module all of whose layers sit inside its ``nn.ModuleList`` / ``nn.Sequential`` children
    (a transformer's stack, e.g. Hugging Face's ``LlamaModel`` with its ``layers``) is opened
    too, so each decoder layer is a block; a module that holds a layer directly (a residual
    block's convs) stays whole.
    """
    wanted = set(layer_names)

    def holds(name: str) -> bool:
        return any(n == name or n.startswith(name + ".") for n in wanted)

    def is_stack(mod: nn.Module) -> bool:
        return isinstance(mod, (nn.Sequential, nn.ModuleList)) and not isinstance(mod, QUANTIZABLE)

    def only_stacks(prefix: str, mod: nn.Module) -> bool:
        """Every wanted layer under ``mod`` is inside one of its stack children."""
        inside = [f"{prefix}.{c}" for c, ch in mod.named_children() if is_stack(ch)]
        mine = [n for n in wanted if n.startswith(prefix + ".")]
        return bool(inside) and all(any(n.startswith(p + ".") for p in inside) for n in mine)

    blocks: list[str] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for cname, child in mod.named_children():
            full = f"{prefix}.{cname}" if prefix else cname
            if not holds(full):
                continue
            if is_stack(child) or (not isinstance(child, QUANTIZABLE) and only_stacks(full, child)):
                visit(full, child)
            else:
                blocks.append(full)

    visit("", model)
    visit = None  # the closure calls itself (a reference cycle holding the model's modules): unbound
    order = {n: i for i, n in enumerate(layer_names)}
    blocks.sort(key=lambda b: min(order[n] for n in wanted if n == b or n.startswith(b + ".")))
    return blocks


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor], what: str):
    """Run ``model`` on each batch until ``block`` is called; return its (args, kwargs) per batch."""
    captured = []

    def pre(_m, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.inference_mode():
            for i, x in enumerate(batches):
                try:
                    model(x)
                except _Stop:
                    continue
                raise RuntimeError(
                    f"block '{what}' was not called by forward() on calibration batch {i}; "
                    "the engine needs every block to run once per forward pass"
                )
    finally:
        h.remove()
    return captured


@dataclass(frozen=True)
class Link:
    """Block ``name`` reads block ``prev``'s output as its first input, and takes every other
    argument as the very same objects ``prev`` took (a transformer's decoder layers: the hidden
    states, then the same attention mask and position embeddings)."""

    prev: str  # the block whose output feeds this one
    tuple_out: bool  # prev returns a tuple whose first item is the hidden state (older transformers)


def _same_objects(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def block_links(model: nn.Module, blocks: list[str], example) -> dict[str, Link]:
    """Blocks whose input *is* the previous block's output (the very tensor, no glue between).

    For such a block the engine feeds the cached outputs of the previous block (with the previous
    block's other arguments) instead of re-running the network up to it.  Read from one forward
    pass with hooks.
    """
    mods = dict(model.named_modules())
    outputs: dict[str, object] = {}
    inputs: dict[str, tuple] = {}
    handles = []
    for b in blocks:
        def pre(_m, args, kwargs, b=b):
            if b not in inputs:
                inputs[b] = (args, kwargs)

        def post(_m, _args, out, b=b):
            if b not in outputs:
                outputs[b] = out
        handles.append(mods[b].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mods[b].register_forward_hook(post))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    links = {}
    for prev, nxt in zip(blocks, blocks[1:]):
        if nxt not in inputs or prev not in inputs:
            continue
        args, kwargs = inputs[nxt]
        out = outputs.get(prev)
        tuple_out = isinstance(out, tuple) and len(out) > 0
        hidden = out[0] if tuple_out else out
        if not (args and isinstance(hidden, torch.Tensor) and args[0] is hidden):
            continue
        p_args, p_kwargs = inputs[prev]
        if not kwargs and len(args) == 1 and not tuple_out:
            links[nxt] = Link(prev, False)  # plain chain (residual networks): nothing else passed
        elif (_same_objects(args[1:], p_args[1:]) and kwargs.keys() == p_kwargs.keys()
              and all(kwargs[k] is p_kwargs[k] for k in kwargs)):
            links[nxt] = Link(prev, tuple_out)
    return links


def run_block(block: nn.Module, inputs, link: Link | None = None) -> list:
    """Outputs of ``block`` on each cached (args, kwargs), as the next block's cached inputs:
    the output first, then (for a ``link`` that carries them) the same other arguments."""
    with torch.inference_mode():
        return [next_inputs(block(*a, **k), a, k, link) for a, k in inputs]


def next_inputs(out, args: tuple, kwargs: dict, link: Link | None) -> tuple[tuple, dict]:
    """The next block's (args, kwargs) from this block's output ``out`` and its own arguments."""
    if link is not None and link.tuple_out:
        out = out[0]
    if link is None or (len(args) == 1 and not kwargs):
        return (out,), {}
    return (out, *args[1:]), kwargs


def capture_layer_inputs(block: nn.Module, layer: nn.Module, inputs) -> list[torch.Tensor]:
    """Run ``block`` on cached inputs until ``layer`` is called; return the layer's raw inputs."""
    rows = []

    def pre(m, args):
        rows.append(args[0])
        raise _Stop

    h = layer.register_forward_pre_hook(pre)
    try:
        with torch.inference_mode():
            for args, kwargs in inputs:
                try:
                    block(*args, **kwargs)
                except _Stop:
                    continue
                raise RuntimeError("layer was not called by its block")
    finally:
        h.remove()
    return rows


def capture_float_layer_inputs(block: nn.Module, layers: dict[str, nn.Module], inputs,
                               keep_outputs: bool = False, link: Link | None = None) -> tuple[dict[str, list], list]:
    """Run the float ``block`` once per cached batch and keep the raw input of every layer in it
    (and the block's outputs when asked).  The float model never changes, so one pass serves
    all the block's layers.
    """
    seen: dict[str, list] = {n: [] for n in layers}
    handles = []
    for n, m in layers.items():
        def pre(_m, args, n=n):
            if len(seen[n]) < batch_no[0] + 1:
                seen[n].append(args[0])
        handles.append(m.register_forward_pre_hook(pre))
    batch_no = [0]
    outs = []
    try:
        with torch.inference_mode():
            for i, (args, kwargs) in enumerate(inputs):
                batch_no[0] = i
                y = block(*args, **kwargs)
                if keep_outputs:
                    outs.append(next_inputs(y, args, kwargs, link))
    finally:
        for h in handles:
            h.remove()
    return seen, outs


def stream_layer_stats(
    flayer: nn.Module, f_raw: list[torch.Tensor],
    qblock: nn.Module, qlayer: nn.Module, q_inputs,
    opts: StreamOptions, same: bool = False, weight: torch.Tensor | None = None, keep_f: bool = True,
    name: str = "layer", starts: list[int] | None = None,
) -> list[LayerStats]:
    """Statistics of one layer's inputs, streamed batch by batch.

    ``weight`` (g, out/g, N0): also record each output channel's float energy ‖X w_i‖²;
    ``keep_f``: also accumulate F = XᵀX (only needed when no ``weight`` is given).

    ``f_raw``: the layer's raw inputs in the float model, one tensor per batch; the quantized
    model's inputs come from re-running ``qblock`` on its cached inputs up to the layer.

    Each batch's inputs and the running statistics are checked for NaN/inf (one sum each, the
    products' diagonals per batch and the whole products once at the end): a non-finite input or
    a float32 overflow in the products raises a ValueError naming the layer ``name`` and the
    batch (``starts``: each batch's first sample, to name the sample too).
    """
    gen = torch.Generator().manual_seed(opts.seed)
    acc = None
    for i, (qa, qk) in enumerate(q_inputs):
        x_raw = f_raw[i]
        _check_layer_input(x_raw, name, opts.first_batch + i, False, starts)
        xt_raw = x_raw if same else capture_layer_inputs(qblock, qlayer, [(qa, qk)])[0]
        if not same:
            _check_layer_input(xt_raw, name, opts.first_batch + i, True, starts)
        # Unfold a few samples at a time: patches are ~k²× the activations, keep them small.
        step = opts.chunk if x_raw.dim() > 2 else x_raw.shape[0]
        for j in range(0, x_raw.shape[0], step):
            acc = _accumulate(acc, flayer, x_raw[j:j + step], xt_raw[j:j + step], same, opts, gen, weight, keep_f)
        bad = acc.first_nonfinite(full=False)
        if bad is not None:
            big = f"|x| up to {max(float(x_raw.abs().max()), float(xt_raw.abs().max())):.3g}"
            _overflow(name, f"at batch {opts.first_batch + i} ({bad} is not finite; {big})", acc.weight is not None
                      and bad.startswith("the output energies"))
        acc.close_batch()
    acc.finish(opts.combine)
    bad = acc.first_nonfinite(full=True)
    if bad is not None:
        _overflow(name, f"({bad} is not finite)", False)
    return acc.stats()


def _overflow(name: str, where: str, weights_too: bool) -> None:
    too_large = "the inputs or the weights are too large" if weights_too else "the inputs are too large"
    raise ValueError(f"layer '{name}': its input statistics overflow float32 {where}: {too_large}, "
                     "rescale them (e.g. normalise the calibration data)")


def _accumulate(acc, layer, x_raw, xt_raw, same, opts, gen, weight=None, keep_f=True):
    """Add one chunk of float / quantized-model layer inputs to the running statistics."""
    X = layer_rows(layer, x_raw)  # (g, m, N0)
    Xt = X if same else layer_rows(layer, xt_raw)
    if opts.patch_fraction < 1.0:
        state = gen.get_state()
        X = _subsample(X, opts.patch_fraction, gen)
        if not same:
            gen.set_state(state)  # the same rows of X and X̃
            Xt = _subsample(Xt, opts.patch_fraction, gen)
        else:
            Xt = X
    if acc is None:
        acc = StatsAccumulator(X.shape[0], X.shape[2], weight, keep_f, device=X.device, first_batch=opts.first_batch)
    acc.add(X, Xt)
    return acc
