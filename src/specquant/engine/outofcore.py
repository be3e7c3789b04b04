"""Out-of-core quantization: one block's weights resident at a time, activations spilled to disk.

:func:`quantize_streamed` is the block walk of :func:`specquant.engine.apply.quantize` for a
model whose block weights live on the meta device until needed.  The caller's :class:`BlockIO`
fills a block's float weights (into the float copy and the copy being quantized), writes the
packed result of a quantized block, and drops weights back to the meta device.  Per block the
walk runs the same functions as the in-memory engine (``capture_float_layer_inputs``,
``quantize_block_layers`` with its ``stream_layer_stats`` and the method, ``run_block``) on the
same inputs, so the codes and scales are the same, bit for bit.

The two activation streams of each block boundary (float X and partly quantized X̃) go through an
:class:`~specquant.engine.spill.ActivationStore`: in memory up to its budget, else memory-mapped
files.  A block that does not take the previous block's output (a language model's ``lm_head``
after the final norm) gets its inputs from a forward pass of the model in which the blocks
before it are replaced by stand-ins: pass-throughs, and the last one replays the cached outputs
of the real block.  That needs the blocks before it to form one chain (each takes the previous
one's output), as a transformer's decoder layers do; anything else is refused with one line.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

from torch import nn

from specquant.algorithms.base import QuantConfig
from specquant.core.grid import check_bits, check_finite
from specquant.engine.apply import (
    BlockState,
    QuantReport,
    _progress,
    current_rss_mb,
    kv_cache_off,
    method_of,
    peak_rss_mb,
    quantize_block_layers,
)
from specquant.engine.calibrate import (
    StreamOptions,
    as_batches,
    batch_starts,
    block_links,
    capture_block_inputs,
    capture_float_layer_inputs,
    check_calibration_finite,
    find_blocks,
    run_block,
)
from specquant.engine.spill import ActivationStore
from specquant.engine.walk import forward_order, parameter_holders, quantizable_layers, resolve_ties, skipped_modules


@dataclass
class BlockIO:
    """How the walk gets and gives back the weights of a block (named by its module name)."""

    load: Callable[[str, nn.Module | None, nn.Module | None], None]  # (name, float block, quantized block):
    #                                                                   fill both (either may be None) with the
    #                                                                   block's float weights
    save: Callable[[str, nn.Module], None]  # (name, quantized block): write its packed result
    drop: Callable[[str, nn.Module], None]  # (name, block): its weights back to the meta device


@dataclass
class StreamedReport:
    """What :func:`quantize_streamed` did beyond the :class:`QuantReport`."""

    report: QuantReport  # per-layer records, as the in-memory engine's
    block_seconds: list[tuple[str, float]]  # each block's wall time (load, statistics, algorithm, write)
    block_rss_mb: list[float]  # resident memory (MiB) after each block was written and dropped
    spilled_bytes: int  # hidden-state bytes written to the store's files
    blocks: list[str]  # the blocks walked, in order (a block after the last quantized layer is not walked)


def streamed_blocks(model: nn.Module) -> list[str]:
    """The blocks whose weights are read on demand: those of all quantizable layers (skipped or
    not); every parameter outside them is resident for the whole run."""
    return find_blocks(model, [n for n, _ in quantizable_layers(model)])


@contextlib.contextmanager
def _lazy(model: nn.Module, blocks: list[str], io: BlockIO):
    """Each block's weights loaded when the forward pass enters it and dropped when it leaves: a
    forward pass of the whole model with one block resident (for the structure probes)."""
    mods = dict(model.named_modules())
    handles = []
    for b in blocks:
        handles.append(mods[b].register_forward_pre_hook(lambda m, _a, b=b: io.load(b, None, m)))
        handles.append(mods[b].register_forward_hook(lambda m, _a, _o, b=b: io.drop(b, m)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Replay(nn.Module):
    """Stands in for a block: passes its first input through, or returns the cached outputs of
    the real block for the current batch."""

    def __init__(self, outputs=None, tuple_out: bool = False):
        super().__init__()
        self.outputs, self.tuple_out, self.batch = outputs, tuple_out, 0

    def forward(self, hidden, *args, **kwargs):
        if self.outputs is not None:
            return self.outputs[self.batch][0][0]
        return (hidden,) if self.tuple_out else hidden


def _chain_inputs(model: nn.Module, block: nn.Module, batches: list, name: str, before: list[str], outputs,
                  tuple_out: bool) -> list:
    """Inputs of ``block`` in ``model`` when the blocks ``before`` it (a chain) are not resident:
    they are replaced by stand-ins, the last one replaying ``outputs`` (its cached outputs)."""
    if not before:
        return capture_block_inputs(model, block, batches, name)
    stands = [_Replay(None, tuple_out) for _ in before[:-1]] + [_Replay(outputs)]
    real = [model.get_submodule(b) for b in before]
    for b, s in zip(before, stands):
        model.set_submodule(b, s)
    try:
        captured = []
        for i, x in enumerate(batches):
            stands[-1].batch = i
            captured.extend(capture_block_inputs(model, block, [x], name))
        return captured
    finally:
        for b, m in zip(before, real):
            model.set_submodule(b, m)


def _check_chain(blocks: list[str], links: dict, k: int) -> None:
    """The blocks before block ``k`` must form one chain for their outputs to be replayed."""
    for j in range(1, k):
        if links.get(blocks[j]) is None:
            raise ValueError(f"out-of-core quantization needs the blocks before '{blocks[k]}' to form one chain "
                             f"(each taking the previous one's output); block '{blocks[j]}' does not")


def quantize_streamed(model: nn.Module, float_model: nn.Module, config: QuantConfig, calib, io: BlockIO,
                      store: ActivationStore, *, batch_size: int = 128, progress: bool = True) -> StreamedReport:
    """Quantize ``model`` block by block with one block's weights resident at a time.

    ``model`` and ``float_model``: two copies of the architecture whose modules outside the
    blocks (embeddings, final norm) hold real weights and whose blocks are on the meta device;
    ``io`` loads, saves and drops blocks; ``store`` holds the cached block inputs.  The codes and
    scales are those of ``specquant.quantize(model_with_weights, config, calib)`` (same batches,
    same seed).  Methods that need a view of the whole model first (AWQ) are refused.
    """
    t_start = time.perf_counter()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a specquant config (e.g. GPFQConfig), got {type(config).__name__}")
    check_bits(config.bits, "config.bits")
    if config.awq:
        raise ValueError("out-of-core quantization does not run the AWQ pre-step (it searches scales on the whole "
                         "float model); quantize in memory or pick another method")
    method = method_of(config)
    model.eval()
    float_model.eval()
    batches = as_batches(calib, batch_size)
    check_calibration_finite(batches)
    example = batches[0][:1]  # structure probes: one sample is enough
    if example.dim() == 2 and not example.is_floating_point():  # token ids: a few tokens show the structure too
        example = example[:, :16]
    with kv_cache_off(model), kv_cache_off(float_model):
        lazy = streamed_blocks(model)  # every block, walked or not: the probes run the whole model
        with _lazy(model, lazy, io):
            called = forward_order(model, example)
        layer_order = [n for n in called if not config.settings_for(n).skip]
        ties = resolve_ties(model, layer_order, lambda n: config.settings_for(n).skip)
        layer_order = ties.layer_order
        # Blocks hold every called layer (a block left in float is still run: later blocks read its
        # output); blocks after the last one with a layer to quantize are not walked at all.
        blocks = find_blocks(model, called)
        busy = [k for k, b in enumerate(blocks) if any(n == b or n.startswith(b + ".") for n in layer_order)]
        blocks = blocks[:busy[-1] + 1] if busy else []
        with _lazy(model, lazy, io):
            links = block_links(model, blocks, example)
        return _walk(model, float_model, config, method, batches, io, store, layer_order, ties, blocks, links,
                     batch_size, progress, t_start)


def _walk(model, float_model, config, method, batches, io, store, layer_order, ties, blocks, links, batch_size,
          progress, t_start) -> StreamedReport:
    mods, fmods = dict(model.named_modules()), dict(float_model.named_modules())
    report = QuantReport(method=config.method, config=config.to_dict(), n_calib=sum(b.shape[0] for b in batches))
    bar = _progress(len(layer_order), progress)
    state = BlockState(config, method, mods, fmods, StreamOptions(batch_size=batch_size, seed=config.seed),
                       batch_starts(batches), ties, parameter_holders(model), report, bar)
    tuple_out = any(link.tuple_out for link in links.values())
    any_quantized = False
    f_next = q_next = None
    timings, rss = [], []
    for k, name in enumerate(blocks):
        t0 = time.perf_counter()
        in_block = [n for n in layer_order if n == name or n.startswith(name + ".")]
        fblock, qblock = fmods[name], mods[name]
        io.load(name, fblock, qblock)
        for n in in_block:
            check_finite(mods[n].weight.detach(), f"layer '{n}' weight")
        linked = links.get(name) is not None and f_next is not None
        if not linked:
            _check_chain(blocks, links, k)
        f_in = f_next if linked else store.put("f", _chain_inputs(float_model, fblock, batches, name, blocks[:k],
                                                                   f_next, tuple_out))
        if not any_quantized:
            q_in = f_in
        else:
            q_in = q_next if linked else store.put("q", _chain_inputs(model, qblock, batches, name, blocks[:k],
                                                                       q_next, tuple_out))
        link = links.get(blocks[k + 1]) if k + 1 < len(blocks) else None
        feeds = link if link is not None and link.prev == name else None
        keep = k + 1 < len(blocks)  # a later block reads this one's outputs (directly or through a replay)
        if bar is not None:
            bar.set_postfix_str(f"block {k + 1}/{len(blocks)} {name}")
        f_raw, f_out = capture_float_layer_inputs(fblock, {n: fmods[n] for n in in_block}, f_in,
                                                  keep_outputs=keep, link=feeds)
        f_in = f_next = None  # drop references early: cached activations are the walk's main memory
        quantize_block_layers(state, in_block, f_raw, qblock, q_in, any_quantized)
        any_quantized = any_quantized or bool(in_block)
        q_out = run_block(qblock, q_in, feeds) if keep else None
        q_in = q_next = f_raw = None
        io.save(name, qblock)
        io.drop(name, fblock)
        io.drop(name, qblock)
        f_next, q_next = store.put("f", f_out), store.put("q", q_out)
        del f_out, q_out
        timings.append((name, time.perf_counter() - t0))
        rss.append(current_rss_mb())
    if bar is not None:
        bar.close()
    report.skipped = skipped_modules(model, set(layer_order), set(), ties.reasons)
    report.seconds = time.perf_counter() - t_start
    report.peak_rss_mb = peak_rss_mb()
    return StreamedReport(report, timings, rss, store.spilled_bytes, blocks)
