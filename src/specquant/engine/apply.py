"""``quantize(model, config, calib)``: the one place that walks a model and changes it."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from specquant.algorithms.base import LayerStats, Method, QuantConfig, QuantContext, ResolvedSettings, get_method
from specquant.algorithms.common import row_output_error
from specquant.core.actquant import TokenActQuantizer
from specquant.core.grid import Granularity, GridSpec, check_bits, check_finite, scale_dtype
from specquant.core.layouts import RowsLayout
from specquant.core.qweight import QuantizedWeight
from specquant.engine.actquant import calibrate_input_quantizer, install_input_quantizer, layer_input_sample
from specquant.engine.awq import AWQRecord, apply_awq
from specquant.engine.calibrate import (
    StreamOptions,
    all_finite,
    as_batches,
    batch_starts,
    block_links,
    capture_block_inputs,
    capture_float_layer_inputs,
    check_calibration_finite,
    find_blocks,
    run_block,
    stream_layer_stats,
)
from specquant.engine.distributed import Dist, check_distributed, owned_method, shard_range
from specquant.engine.smoothquant import SmoothQuantRecord, apply_smoothquant
from specquant.engine.walk import (
    FoldedBN,
    SkippedModule,
    fold_batchnorm,
    forward_order,
    is_quantizable,
    parameter_holders,
    quantizable_layers,
    resolve_ties,
    skipped_modules,
)
from specquant.hf_compat import linearize_conv1d


@dataclass
class LayerRecord:
    """What happened to one layer."""

    name: str  # module name
    type: str  # Linear / Conv1d / Conv2d
    shape: list  # weight shape
    params: int  # number of weights
    bits: int  # storage bits per code (the widest row's, when rows mix widths)
    levels: int  # distinct values of the grid (of the widest rows)
    method: str  # algorithm
    bits_per_weight: float  # true storage per weight as saved: codes, scales (config.scale_dtype), zero points
    weight_sqnr_db: float  # 10·log10(‖W‖²/‖W − Ŵ‖²)
    rel_output_error: float | None  # ‖XWᵀ − X̃Ŵᵀ‖/‖XWᵀ‖ on the calibration data (None without data;
    #                                  inf when the float output is 0 and the quantized one is not)
    seconds: float  # wall time for this layer (statistics + algorithm)
    code_bits: float = 0.0  # stored code bits per weight (3-level codes take 1.6; mixed rows average)
    row_bits: list | None = None  # each output row's width when rows mix widths, else None
    act: dict | None = None  # the input quantizer (config.act_bits): bits, scale, zero_point, calibrator


@dataclass
class QuantReport:
    """Per-layer records and totals of one ``quantize`` call."""

    method: str
    config: dict
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    folded_bn: list[FoldedBN] = field(default_factory=list)
    awq: list[AWQRecord] = field(default_factory=list)  # the AWQ pre-step, one record per input group (config.awq)
    linearized: list[str] = field(default_factory=list)  # transformers Conv1D layers turned into nn.Linear first
    smoothquant: list[SmoothQuantRecord] = field(default_factory=list)  # per input group (config.smoothquant)
    seconds: float = 0.0  # total wall time
    n_calib: int = 0  # calibration samples used
    peak_rss_mb: float = 0.0  # the process's peak resident memory when quantize returned (MiB; 0 where unknown)

    @property
    def num_weights(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def avg_bits(self) -> float:
        """Average stored code bits per weight over the quantized layers (scales not included;
        3-level layers count 1.6 bits, five codes per byte)."""
        n = self.num_weights
        return sum(r.code_bits * r.params for r in self.layers) / n if n else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Average true storage bits per weight over the quantized layers: codes, scales at their storage
        dtype and stored zero points (``QuantizedWeight.bits_per_weight``), file headers not included."""
        n = self.num_weights
        return sum(r.bits_per_weight * r.params for r in self.layers) / n if n else 0.0

    def summary(self) -> str:
        """What the run decided, in a few lines: layers and weights quantized, the bits per weight
        split into code and scale bits (the one definition of specquant's reports; the saved file
        adds its headers, which ``specquant.io.storage_breakdown`` measures), the size against
        float32 weights, the worst layer and the time."""
        n = self.num_weights
        if not n:
            return f"{self.method}: no layer quantized ({len(self.skipped)} skipped), {self.seconds:.1f} s"
        code, total = self.avg_bits, self.bits_per_weight
        measured = [r for r in self.layers if r.rel_output_error is not None]
        worst = max(measured, key=lambda r: r.rel_output_error) if measured else None
        lines = [
            f"{self.method}: {len(self.layers)} layers, {n:,} weights quantized in {self.seconds:.1f} s"
            + (f" ({len(self.skipped)} modules left in float)" if self.skipped else ""),
            f"{total:.3f} bits per weight = {code:.3f} code + {total - code:.3f} scale (and zero point) bits; "
            f"{32.0 / total:.1f}× smaller than float32 for these layers (the saved file adds its headers)",
            (f"largest relative output error {worst.rel_output_error:.4g} in layer {worst.name!r}; "
             if worst is not None else "no output error measured (no calibration data); ")
            + f"{self.n_calib} calibration samples",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "config": self.config,
            "avg_bits": self.avg_bits,
            "bits_per_weight": self.bits_per_weight,
            "quant_seconds": self.seconds,
            "n_calib": self.n_calib,
            "peak_rss_mb": self.peak_rss_mb,
            "layers": [layer_dict(r) for r in self.layers],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "folded_bn": [dataclasses.asdict(f) for f in self.folded_bn],
            **({"awq": [dataclasses.asdict(r) for r in self.awq]} if self.awq else {}),
            **({"linearized": list(self.linearized)} if self.linearized else {}),
            **({"smoothquant": [dataclasses.asdict(r) for r in self.smoothquant]} if self.smoothquant else {}),
        }


def layer_dict(record: LayerRecord) -> dict:
    """A layer record as a dict; ``act`` only when the layer quantizes its input (so reports of
    runs without activation quantization are what they were before it existed)."""
    d = dataclasses.asdict(record)
    if d["act"] is None:
        del d["act"]
    return d


def method_of(config: QuantConfig) -> Method:
    """The registered method of ``config`` (by ``config.method``; the config must be of its type)."""
    method = get_method(config.method)
    if not isinstance(config, method.config_type):
        raise TypeError(f"method {method.name!r} takes a {method.config_type.__name__}, "
                        f"got {type(config).__name__}")
    return method


@contextlib.contextmanager
def kv_cache_off(model: nn.Module):
    """Turn off the key/value cache of Hugging Face models (``config.use_cache``) for the walk:
    re-running a decoder layer on cached inputs must not append to a cache, and calibration
    forwards need none.  Restored on exit."""
    saved = []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None) is True and all(c is not cfg for c, _ in saved):
            saved.append((cfg, True))
            cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, old in saved:
            cfg.use_cache = old


def model_device(model: nn.Module) -> torch.device | None:
    """The one device all of ``model``'s parameters and buffers are on, else None (none, or split)."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    return devices.pop() if len(devices) == 1 else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (0.0 where the platform does not say):
    ``getrusage``'s, or /proc's VmHWM where larger (getrusage can trail the current figure by a
    few hundred KiB)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB elsewhere
    return max(peak, _proc_status_mb("VmHWM:"))


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (0.0 where /proc is not there)."""
    return _proc_status_mb("VmRSS:")


def _proc_status_mb(field: str) -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _check_forward(model: nn.Module, x: torch.Tensor) -> None:
    """Run one batch; on failure raise a one-line ValueError naming the layer that broke."""
    current = {"name": None}
    handles = []
    for name, mod in model.named_modules():
        if name and len(list(mod.children())) == 0:
            def pre(_m, _a, name=name):
                current["name"] = name
            handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            model(x)
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        where = f" at layer '{current['name']}'" if current["name"] else ""
        raise ValueError(
            f"calibration batch of shape {tuple(x.shape)} does not fit the model{where}: {_first_line(e)}"
        ) from None
    finally:
        for h in handles:
            h.remove()


def _check_model(model: nn.Module, config: QuantConfig) -> None:
    """Up-front checks of the weights, before any work: one-line errors naming the layer."""
    for mname, mod in model.named_modules():
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t.is_meta:
                what = "layer" if is_quantizable(mod) else "module"
                raise ValueError(f"{what} '{mname}': {pname} is on the meta device (no data); "
                                 "load real weights before quantizing")
    for name, mod in quantizable_layers(model):
        if config.settings_for(name).skip:
            continue
        if mod.weight.numel() == 0:
            raise ValueError(f"layer '{name}': weight has shape {tuple(mod.weight.shape)}: nothing to quantize")
        check_finite(mod.weight.detach(), f"layer '{name}' weight")
        if mod.bias is not None:
            check_finite(mod.bias.detach(), f"layer '{name}' bias")


def _to_module_shape(qw: QuantizedWeight, shape: torch.Size) -> QuantizedWeight:
    """Reshape a 2-D (out, N0) result to the module's weight shape (codes and scales)."""
    if type(qw) is not QuantizedWeight or tuple(qw.codes.shape) == tuple(shape):
        return qw
    codes = qw.codes.reshape(shape)
    sshape = qw.granularity.scale_shape(tuple(shape))
    return dataclasses.replace(qw, codes=codes, scale=qw.scale.reshape(sshape),
                               zero_point=qw.zero_point.reshape(sshape))


ROW_BLOCK_BYTES = 64 * 2**20  # a layer whose (out, N0) float64 copy is larger is quantized in blocks of rows


def _row_pieces(shape, groups: int, stats: list[LayerStats] | None, granularity: Granularity,
                whole: bool = False) -> list:
    """The row ranges the algorithm runs on, each with its statistics: (r0, r1, stats or None).

    A grouped convolution: one piece per conv group (its own statistics).  A layer whose float64
    (out, N0) copy exceeds ``ROW_BLOCK_BYTES`` and whose scales are per row (channel or group
    granularity): blocks of rows sharing the statistics (output energies sliced).  Every method
    quantizes rows independently given H and G (see ``_quantize_mixed_rows``), so the blocks only
    bound the memory the algorithm and the error report hold at once (a 32000 × 2048 head: 0.5 GB
    per float64 copy instead of several GB); the cut depends on the shape alone, so every run of
    the same layer cuts it the same way.  ``whole``: no blocks of rows (methods whose result is not
    a plain ``QuantizedWeight``)."""
    out, n0 = shape
    rows = out // groups
    if groups > 1:
        return [(g * rows, (g + 1) * rows, stats[g] if stats is not None else None) for g in range(groups)]
    if whole or out * n0 * 8 <= ROW_BLOCK_BYTES or granularity.kind not in ("channel", "group"):
        return [(0, out, stats[0] if stats is not None else None)]
    step = max(1, ROW_BLOCK_BYTES // (8 * n0))
    pieces = []
    for r0 in range(0, out, step):
        r1 = min(r0 + step, out)
        sp = None
        if stats is not None:
            s0 = stats[0]
            sp = dataclasses.replace(s0, energy=None if s0.energy is None else s0.energy[r0:r1])
        pieces.append((r0, r1, sp))
    return pieces


def _concat_groups(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if len(parts) == 1:
        return parts[0]
    if any(p.granularity.kind == "tensor" for p in parts):
        raise ValueError("per-tensor granularity is not supported on grouped convolutions; use 'channel'")
    p0 = parts[0]
    return dataclasses.replace(
        p0, codes=torch.cat([p.codes for p in parts]), scale=torch.cat([p.scale for p in parts]),
        zero_point=torch.cat([p.zero_point for p in parts]),
    )


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="quantize", unit="layer", file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()), leave=False)


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib=None,
    *,
    example_input: torch.Tensor | None = None,
    fold_bn: bool = True,
    batch_size: int = 128,
    patch_fraction: float = 1.0,
    progress: bool = True,
    device: torch.device | str | None = None,
    dist: Dist | None = None,
) -> QuantReport:
    """Quantize ``model``'s Linear/Conv layers in place, in forward order, and report per layer.

    Args:
        model: any ``nn.Module`` in eval mode.
        config: a method config (RTNConfig, GPFQConfig, SPFQConfig, GPTQConfig, QronosConfig, FrameConfig).
        calib: calibration inputs: a tensor (N, …), or an iterable of tensors or (x, y) batches.
            Required by data-driven methods; used by the others for BN folding and the report.
        example_input: a batch used to read the forward order when ``calib`` is None.
        fold_bn: fold BatchNorm into the preceding conv/linear before quantizing.
        batch_size: calibration samples per forward pass.
        patch_fraction: share of conv patches kept in the statistics (random, seeded by config.seed).
        progress: show a progress bar over layers on stderr (only when it is a terminal).
        device: move the model there first (e.g. "cuda"); default: leave it where it is.  The
            calibration batches are moved to the model's device (when all its parameters share
            one), and the statistics and the algorithms run there.
        dist: a rank of an initialised ``torch.distributed`` group (``Dist.current()``): every rank
            calls ``quantize`` with the same model and calibration data, streams a contiguous shard of
            the batches, and all ranks end with the same quantized model, equal to the one-process
            result (engine/distributed.py).

    Each quantized module keeps its ``QuantizedWeight`` as ``module.qweight`` and its weight
    holds the dequantized values, so the model runs as a fake-quant model; ``specquant.save``
    writes the packed codes.
    """
    t_start = time.perf_counter()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a specquant config (e.g. GPFQConfig), got {type(config).__name__}")
    check_bits(config.bits, "config.bits")
    if not 0.0 < patch_fraction <= 1.0:
        raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction}")
    method = method_of(config)
    if device is not None:
        model.to(device)
    model.eval()
    linearized = linearize_conv1d(model)  # GPT-2's Conv1D projections become the nn.Linear they compute
    _check_model(model, config)
    where = model_device(model)

    batches = as_batches(calib, batch_size) if (calib is not None or config.needs_data) else None
    if batches is not None and where is not None:
        batches = [b.to(where) for b in batches]
    if example_input is not None and where is not None:
        example_input = example_input.to(where)
    if batches is not None:
        check_calibration_finite(batches)
    example = batches[0] if batches else example_input
    if batches is not None and dist is not None and dist.world > 1:
        check_distributed(config, patch_fraction, len(batches), dist.world, batch_size)
    if example is not None:
        # Structure probes (shape check, BN pairing, call order, block links) keep activations
        # alive for a whole forward pass: two samples are enough and keep that memory small.
        example = example[:2]
    with kv_cache_off(model):
        report = _walk(model, config, method, batches, example, fold_bn, batch_size, patch_fraction, progress, dist)
    report.linearized = linearized
    report.seconds = time.perf_counter() - t_start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _walk(model: nn.Module, config: QuantConfig, method: Method, batches, example, fold_bn: bool,
          batch_size: int, patch_fraction: float, progress: bool, dist: Dist | None = None) -> QuantReport:
    """The block-by-block walk of :func:`quantize` (arguments checked there)."""
    if example is not None:
        _check_forward(model, example)
    folded: list[FoldedBN] = []
    if fold_bn and example is not None:
        folded = fold_batchnorm(model, example)
    # SmoothQuant pre-step (engine/smoothquant.py): activation outliers migrated into the weights, function kept
    sq_records = apply_smoothquant(model, config, batches, example) if config.smoothquant is not None else []
    # AWQ pre-step (engine/awq.py): scales searched on the float model and folded into it
    # (function unchanged) before any layer is quantized; the method then rounds the scaled weights.
    awq_records = apply_awq(model, config, batches, example) if config.awq else []
    if example is not None:
        layer_order = forward_order(model, example)
    else:
        layer_order = [n for n, _ in quantizable_layers(model)]
    layer_order = [n for n in layer_order if not config.settings_for(n).skip]
    # A weight shared by several modules is quantized once (at its first user) or kept in float.
    ties = resolve_ties(model, layer_order, lambda n: config.settings_for(n).skip)
    layer_order = ties.layer_order
    holders = parameter_holders(model)
    mods = dict(model.named_modules())
    report = QuantReport(method=config.method, config=config.to_dict(), folded_bn=folded, awq=awq_records,
                         smoothquant=sq_records, n_calib=sum(b.shape[0] for b in batches) if batches else 0)
    starts = batch_starts(batches) if batches else None
    opts = StreamOptions(batch_size=batch_size, patch_fraction=patch_fraction, seed=config.seed)
    if dist is not None and dist.world > 1:  # this rank's shard of the batches; results from the layers' owners
        first, stop = shard_range(len(batches), dist.rank, dist.world) if batches else (0, 0)
        if batches:
            opts = dataclasses.replace(opts, first_batch=first, combine=dist.combine(len(batches)))
            batches = batches[first:stop]
        method = owned_method(method, dist, layer_order)

    use_data = batches is not None
    float_model = copy.deepcopy(model) if use_data else None
    fmods = dict(float_model.named_modules()) if use_data else {}
    bar = _progress(len(layer_order), progress)
    blocks = find_blocks(model, layer_order) if use_data else [None]
    links = block_links(model, blocks, example) if use_data else {}
    state = BlockState(config, method, mods, fmods, opts, starts, ties, holders, report, bar)
    any_quantized = False
    f_next = q_next = None
    for k, block_name in enumerate(blocks):
        if use_data:
            in_block = [n for n in layer_order if n == block_name or n.startswith(block_name + ".")]
            fblock, qblock = fmods[block_name], mods[block_name]
            linked = links.get(block_name) is not None and f_next is not None
            f_in = f_next if linked else capture_block_inputs(float_model, fblock, batches, block_name)
            if not any_quantized:
                q_in = f_in
            else:
                q_in = q_next if linked else capture_block_inputs(model, qblock, batches, block_name)
            q_next = None  # drop references early: cached activations are the engine's main memory
            link = links.get(blocks[k + 1]) if k + 1 < len(blocks) else None
            feeds_next = link is not None and link.prev == block_name
            f_raw, f_next = capture_float_layer_inputs(fblock, {n: fmods[n] for n in in_block}, f_in,
                                                       keep_outputs=feeds_next, link=link)
            del f_in
            if bar is not None:
                bar.set_postfix_str(f"block {k + 1}/{len(blocks)} {block_name}")
        else:
            in_block, f_raw, qblock, q_in = layer_order, None, None, None
        quantize_block_layers(state, in_block, f_raw, qblock, q_in, any_quantized)
        any_quantized = any_quantized or bool(in_block)
        if use_data:
            q_next = run_block(qblock, q_in, link) if feeds_next else None
            if not feeds_next:
                f_next = None
            del q_in, f_raw
    if bar is not None:
        bar.close()
    report.skipped = skipped_modules(model, set(layer_order), {f.bn for f in folded}, ties.reasons)
    return report


@dataclass
class BlockState:
    """What the per-layer loop of one block reads and updates: shared by the in-memory walk
    (:func:`quantize`) and the out-of-core walk (``engine/outofcore.py``), so both run the very
    same statistics and algorithm code on each layer."""

    config: QuantConfig  # the method config (with its per-module map)
    method: Method  # the registered method of config
    mods: dict  # name -> module of the model being quantized
    fmods: dict  # name -> module of the float model (empty without data)
    opts: StreamOptions  # how layer inputs are streamed into statistics
    starts: list | None  # each calibration batch's first sample (None without data)
    ties: object  # engine.walk.TiedWeights: followers of shared weights
    holders: dict  # id(Parameter) -> its holders (engine.walk.parameter_holders)
    report: QuantReport  # receives one LayerRecord per layer
    bar: object  # the progress bar (or None)


def quantize_block_layers(state: BlockState, in_block: list[str], f_raw: dict | None, qblock: nn.Module | None,
                          q_in, any_quantized: bool) -> None:
    """Quantize the layers ``in_block`` of one block in order: their statistics streamed from the
    float inputs ``f_raw`` (layer name -> one tensor per batch; None without data) and the partly
    quantized block ``qblock`` run on its cached inputs ``q_in``, the method run, the result
    installed and recorded in ``state.report``.  ``any_quantized``: some layer before this block
    was quantized (else the first layer's X̃ is X)."""
    config, method, mods, fmods, opts, starts = (state.config, state.method, state.mods, state.fmods, state.opts,
                                                 state.starts)
    ties, holders, report, bar = state.ties, state.holders, state.report, state.bar
    use_data = f_raw is not None
    shared: dict[str, LayerStats | list[LayerStats]] = {}  # statistics of layers reading one input
    for name in in_block:
        t0 = time.perf_counter()
        mod = mods[name]
        stats: list[LayerStats] | None = None
        if use_data:
            stats = shared.pop(name, None)
            if stats is None:
                readers = _same_input(name, in_block, f_raw, mods)
                if config.act_bits is not None:  # input quantizer first: the layer's own X̃ carries it
                    aq = _input_quantizer(name, config, f_raw[name], qblock, mod, q_in, any_quantized)
                    for n in readers:  # they read the very same tensor: the same quantizer
                        install_input_quantizer(mods[n], aq)
                weight = torch.cat([_grouped_weight(mods[n]) for n in readers], dim=1)
                both = stream_layer_stats(fmods[name], f_raw[name], qblock, mod, q_in, opts,
                                          same=not any_quantized and config.act_bits is None, weight=weight,
                                          keep_f=False, name=name, starts=starts)
                stats = _split_energy(both, [mods[n].weight.shape[0] for n in readers])
                shared.update(zip(readers[1:], stats[1:]))
                stats = stats[0]
            f_raw.pop(name)
        tied = {id(mods[f]) for f in ties.followers.get(name, ())} | {id(mod)}
        shared_bias = mod.bias is not None and any(id(m) not in tied for _, m, _ in holders.get(id(mod.bias), ()))
        record = _quantize_layer(name, mod, stats, config, config.settings_for(name), method, shared_bias)
        if getattr(mod, "act_quant", None) is not None and config.act_bits is not None:
            record.act = mod.act_quant.to_record()
        for f in ties.followers.get(name, ()):  # same Parameter, now dequantized: same codes too
            mods[f].qweight = mod.qweight
        record.seconds = time.perf_counter() - t0
        report.layers.append(record)
        any_quantized = True
        if bar is not None:
            bar.update(1)
        del stats


def _input_quantizer(name: str, config: QuantConfig, f_raw: list, qblock: nn.Module, mod: nn.Module, q_in,
                     any_quantized: bool):
    """Layer ``name``'s input quantizer, calibrated on a sample of its inputs in the partly quantized
    model (``config.act_source="quantized"``; the float inputs while nothing is quantized yet) or in
    the float model (``"float"``)."""
    if config.act_granularity == "token":  # a range per token at run time: nothing to calibrate
        if type(mod) is not nn.Linear:
            raise ValueError(f"layer '{name}': per-token activation quantization (act_granularity='token') is for "
                             f"Linear inputs, this layer is a {type(mod).__name__}; use act_granularity='tensor'")
        return TokenActQuantizer(bits=config.act_bits)
    on_q = config.act_source == "quantized" and any_quantized
    values = layer_input_sample(f_raw, qblock if on_q else None, mod if on_q else None, q_in, config.seed)
    return calibrate_input_quantizer(name, values, config.act_bits, config.act_calibrator, config.act_grid)


def _same_input(name: str, in_block: list[str], f_raw: dict[str, list], mods: dict[str, nn.Module]) -> list[str]:
    """``name`` and the layers after it in its block that read the very same input tensors in the
    float model (q/k/v projections, gate/up): one statistics pass serves them all.  Their input
    is computed before any of them runs, so quantizing one of them cannot change another's input
    in the quantized model either.  Only plain Linear layers are merged (conv groups differ)."""
    mine = f_raw[name]
    if type(mods[name]) is not nn.Linear:
        return [name]
    return [name] + [n for n in in_block if n != name and n in f_raw and type(mods[n]) is nn.Linear
                     and len(f_raw[n]) == len(mine) and all(a is b for a, b in zip(f_raw[n], mine))]


def _split_energy(stats: list[LayerStats], rows: list[int]) -> list[list[LayerStats]]:
    """Per-layer statistics from one pass over stacked weights: the shared products, and each
    layer's own slice of the output energies."""
    out, start = [], 0
    for r in rows:
        out.append([dataclasses.replace(s, energy=None if s.energy is None else s.energy[start:start + r])
                    for s in stats])
        start += r
    return out


def _grouped_weight(mod: nn.Module) -> torch.Tensor:
    """The layer's weight as (groups, out/groups, N0), matching ``layer_cols``."""
    w = mod.weight.detach()
    g = getattr(mod, "groups", 1)
    return w.reshape(g, w.shape[0] // g, -1)


@torch.no_grad()
def _quantize_layer(name: str, mod: nn.Module, stats: list[LayerStats] | None, config: QuantConfig,
                    settings: ResolvedSettings, method: Method, shared_bias: bool = False) -> LayerRecord:
    """Run the algorithm on one module (per conv group) with its resolved ``settings`` and install
    the result.

    ``shared_bias``: the bias Parameter is also held by a module outside this layer's tie group;
    bias correction then gives the layer a new bias instead of changing the shared one."""
    w = mod.weight.detach()
    out = w.shape[0]
    groups = getattr(mod, "groups", 1)
    W2 = w.reshape(out, -1).float().clone()  # (out, N0·groups⁻¹) conv viewed as (out, in·kh·kw); a copy
    row_bits = settings.row_bits
    if row_bits is not None:
        if len(row_bits) != out:
            raise ValueError(f"row_bits for layer '{name}' has {len(row_bits)} widths, the layer has {out} rows")
        if groups > 1:
            raise ValueError(f"layer '{name}': per-row widths are not supported on grouped convolutions")
        pieces = _row_pieces(W2.shape, 1, stats, settings.granularity, whole=True)
        qw = _quantize_mixed_rows(name, W2, pieces[0][2], config, settings, method)
        W_hat = qw.dequantize().reshape(W2.shape).float()
        bits = qw.bits
    else:
        bits = settings.bits
        cfg = _layer_config(name, config, bits, settings.granularity)
        pieces = _row_pieces(W2.shape, groups, stats, settings.granularity)
        parts = []
        W_hat = torch.empty_like(W2)  # (out, N0), filled piece by piece
        k = 0
        while k < len(pieces):
            r0, r1, sp = pieces[k]
            qw = _run(method, W2[r0:r1], sp, cfg, name)
            if len(pieces) > groups and type(qw) is not QuantizedWeight:  # e.g. frame weights: not cut in rows
                pieces, parts, k = _row_pieces(W2.shape, groups, stats, settings.granularity, whole=True), [], 0
                continue
            parts.append(qw)
            W_hat[r0:r1] = qw.dequantize().reshape(r1 - r0, -1).float()
            k += 1
        qw = _concat_groups(parts) if len(parts) > 1 else parts[0]
    if not all_finite(W_hat):
        raise ValueError(f"layer '{name}': method '{config.method}' produced non-finite weights")
    spans = [(r0, r1) for r0, r1, _ in pieces]  # the row ranges the algorithm ran on, with their statistics
    stats = [sp for _, _, sp in pieces] if stats is not None else None
    rel = None
    if stats is not None:
        num = den = 0.0
        for (r0, r1), sg in zip(spans, stats):
            Wg, Hg = W2[r0:r1], W_hat[r0:r1]
            energy = sg.target_energy(Wg)  # (rows,) ‖X w_i‖²
            num += float(row_output_error(Wg, Hg, sg.H, sg.G, energy).sum())
            den += float(energy.sum())
        rel = _relative_error(name, num, den)
        if config.bias_correction:
            shift = []
            for (r0, r1), sg in zip(spans, stats):
                Wg, Hg = W2[r0:r1].double(), W_hat[r0:r1].double()
                shift.append(Wg @ sg.mean_x - Hg @ sg.mean_xt)  # (rows,)
            shift = torch.cat(shift).to(w.dtype)
            if mod.bias is None:
                mod.bias = nn.Parameter(shift)
            elif shared_bias:
                mod.bias = nn.Parameter(mod.bias.detach() + shift)
            else:
                mod.bias.add_(shift)
    mod.weight.copy_(W_hat.reshape(w.shape).to(w.dtype))
    qw = _to_module_shape(qw, w.shape)
    mod.qweight = qw
    err = ref = torch.zeros((), dtype=torch.float64)
    for r0, r1 in spans:  # in row blocks: no float64 copy of a whole large weight
        err = err + (W2[r0:r1] - W_hat[r0:r1]).double().pow(2).sum()
        ref = ref + W2[r0:r1].double().pow(2).sum()
    sqnr = float(10 * torch.log10(ref / err)) if err > 0 else float("inf")
    return LayerRecord(
        name=name, type=type(mod).__name__, shape=list(w.shape), params=w.numel(), bits=bits,
        levels=qw.levels, method=config.method, bits_per_weight=qw.bits_per_weight(),
        weight_sqnr_db=sqnr, rel_output_error=rel, seconds=0.0,
        code_bits=qw.code_bits() / max(1, w.numel()),
        row_bits=None if qw.row_bits is None else [int(b) for b in qw.row_bits.tolist()],
    )


def _relative_error(name: str, num: float, den: float) -> float:
    """sqrt(num / den) from the summed squared output error and float output energy: 0 only when
    the error is 0, inf when the float output is 0 and the error is not."""
    if not (math.isfinite(num) and math.isfinite(den)):
        raise ValueError(f"layer '{name}': the output error is not finite (error {num}, float output energy {den}); "
                         "the inputs or weights overflow float64, rescale them")
    if den > 0:
        return math.sqrt(max(num, 0.0) / den)
    return math.inf if num > 0 else 0.0


def _layer_config(name: str, config: QuantConfig, bits: int, granularity: Granularity) -> QuantConfig:
    """The config an algorithm sees for one layer: ``bits`` and ``granularity`` resolved, no
    per-module map; its errors (e.g. a granularity the method does not support) name the layer."""
    try:
        return dataclasses.replace(config, bits=bits, granularity=granularity, modules={})
    except ValueError as e:
        raise ValueError(f"layer '{name}': {_first_line(e)}") from None


def _run(method: Method, W: torch.Tensor, stats: LayerStats | None, cfg: QuantConfig, name: str):
    """The algorithm on one weight matrix; its errors name the layer."""
    try:
        qw = method.quantize_weight(W, stats, cfg, QuantContext(layer=name, seed=cfg.seed))
    except ValueError as e:
        msg = _first_line(e)
        raise ValueError(msg if f"'{name}'" in msg else f"layer '{name}': {msg}") from None
    stored = getattr(qw, "scale_dtype", None)
    if stored is not None and stored != scale_dtype(cfg.scale_dtype):
        raise ValueError(f"layer '{name}': method '{cfg.method}' gave {str(stored).removeprefix('torch.')} scales, "
                         f"the config asks for scale_dtype {cfg.scale_dtype!r}")
    return qw


def _quantize_mixed_rows(name: str, W: torch.Tensor, stats: LayerStats | None, config: QuantConfig,
                         settings: ResolvedSettings, method: Method) -> QuantizedWeight:
    """Rows of width b quantized together by the algorithm at b bits, for each width present.

    Every method of the engine quantizes the rows of W independently given the layer's input
    statistics (H, G are shared by all rows; the output energies are per row and sliced), so
    quantizing each width's rows on their own is the same computation as one call per width.
    """
    row_bits = settings.row_bits
    out = W.shape[0]  # W (out, N0)
    bt = torch.tensor(row_bits, device=W.device)
    codes = torch.empty(W.shape, dtype=torch.uint8, device=W.device)  # (out, N0)
    scale = torch.empty(out, 1, device=W.device)
    zp = torch.empty(out, 1, device=W.device)
    algorithm = None
    for b in sorted(set(row_bits)):
        idx = torch.nonzero(bt == b).flatten()  # (n_b,)
        sb = stats
        if stats is not None and stats.energy is not None:
            sb = dataclasses.replace(stats, energy=stats.energy[idx])
        qw = _run(method, W[idx], sb, _layer_config(name, config, b, settings.granularity), name)
        grid = GridSpec.default(b, config.symmetric)
        if type(qw) is not QuantizedWeight or qw.granularity.kind != "channel" or qw.spec != grid:
            raise ValueError(f"layer '{name}': per-row widths need per-channel uniform codes on the default "
                             f"grid; method '{config.method}' gave {type(qw).__name__} "
                             f"({qw.granularity.label()}, {qw.spec.kind})")
        codes[idx] = qw.codes.reshape(len(idx), -1).to(torch.uint8)
        scale[idx] = qw.scale.reshape(len(idx), 1).float()
        zp[idx] = qw.zero_point.reshape(len(idx), 1).float()
        algorithm = qw.algorithm
    top = max(row_bits)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zp, spec=GridSpec.default(top, config.symmetric),
                           granularity=Granularity("channel"), algorithm=algorithm or config.method,
                           info={"row_widths": {str(b): row_bits.count(b) for b in sorted(set(row_bits))}},
                           layout=RowsLayout(row_bits, codes.shape, config.symmetric),
                           scale_dtype=scale_dtype(config.scale_dtype))
