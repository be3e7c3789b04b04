"""``quantize_folder``: quantize a Hugging Face model folder under a memory limit (out-of-core).

The architecture is built with its parameters on the meta device (``models/hf.build_empty``);
the modules outside the decoder blocks (embeddings, final norm; a tied ``lm_head``) are read
from the safetensors shards up front, each block when the walk reaches it
(``models/hf.ShardReader``: ``model.safetensors.index.json`` honoured).  The walk
(``engine/outofcore.quantize_streamed``) runs the in-memory engine's per-layer code on one block
at a time, writes the block's packed layers and float tensors to a part file
(``io/parts.PartsWriter``) and drops its weights; cached activations (float X and quantized X̃)
stay in memory up to a budget and go to memory-mapped files beyond it.  The parts are assembled
into one specquant file at the end, whole or nothing.  All temporary files live in one private
folder that is removed on success and on failure.

The result equals ``specquant.quantize`` on the loaded model with the same config, calibration
batches and seed, followed by ``specquant.save`` (same codes, scales and float tensors).
"""
from __future__ import annotations

import copy
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specquant.algorithms.base import QuantConfig
from specquant.engine.apply import QuantReport, current_rss_mb, peak_rss_mb
from specquant.engine.calibrate import as_batches
from specquant.engine.outofcore import BlockIO, quantize_streamed, streamed_blocks
from specquant.engine.spill import ActivationStore
from specquant.engine.walk import quantizable_layers
from specquant.hf_compat import is_hf_conv1d
from specquant.io.parts import PartsWriter
from specquant.models.hf import ShardReader, build_empty

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # GB = 10^9 bytes, GiB = 2^30
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
MB = 2**20  # figures in reports are MiB, as peak_rss_mb


def parse_memory(text) -> int:
    """Bytes of a memory size: ``"3GB"`` (10^9), ``"500MB"``, ``"2.5GiB"`` (2^30), ``"4096MiB"``,
    or a plain number of bytes; anything else is a one-line ValueError."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = _MEMORY.fullmatch(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"memory size {str(text)!r} is not a number with a unit (e.g. 3GB, 500MB, 2GiB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"memory size {str(text)!r} must be more than 0 bytes")
    return n


def release_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation of 1 MiB or more from its own memory map (a fixed
    M_MMAP_THRESHOLD), so that a freed block's weights go back to the system at once.  With the
    default dynamic threshold, tensors of up to 32 MiB come from the heap once a larger one has
    been freed, and loading and dropping blocks fragments it: the resident memory then grows by
    tens of MiB per block.  Process-wide and best effort: False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


@dataclass
class MemoryEstimate:
    """The peak an out-of-core run expects, in bytes, and its parts."""

    base: int  # the process before any weight is read (interpreter, torch, transformers)
    resident: int  # the weights outside the blocks (embeddings, final norm), float32
    blocks: int  # the largest block in float32, twice (its float copy and the copy being quantized)
    statistics: int  # the largest layer's N0×N0 float64 statistics and the algorithm's copies: 10 of them
    #                  (measured: GPTQ on a 5632-input layer peaked 9.5 N0² float64 above the rest)
    work: int  # per-block transients: every layer's float inputs, the block outputs, the largest layer output
    activations: int  # the budget of cached block inputs kept in memory (beyond it: memory-mapped files)

    @property
    def total(self) -> int:
        return self.base + self.resident + self.blocks + self.statistics + self.work + self.activations

    def to_dict(self) -> dict:
        return {k: round(getattr(self, k) / MB, 1) for k in
                ("base", "resident", "blocks", "statistics", "work", "activations", "total")}

    def text(self) -> str:
        d = self.to_dict()
        return (f"{d['total']:.0f} MiB = {d['base']:.0f} process + {d['resident']:.0f} embeddings/norms + "
                f"{d['blocks']:.0f} largest block ×2 + {d['statistics']:.0f} statistics + {d['work']:.0f} "
                f"block transients + {d['activations']:.0f} cached activations")


@dataclass
class OutOfCoreResult:
    """What :func:`quantize_folder` did."""

    report: QuantReport  # per-layer records (as specquant.quantize's)
    path: Path  # the packed file written
    max_memory: int | None  # the limit in bytes (None: none)
    estimate: MemoryEstimate  # the peak expected before starting
    block_seconds: list[tuple[str, float]]  # wall time per block (load, statistics, algorithm, write)
    block_rss_mb: list[float]  # resident memory (MiB) after each block was written and dropped
    spilled_bytes: int  # cached activation bytes written to memory-mapped files
    seconds: float  # total wall time
    walk_peak_rss_mb: float = 0.0  # the peak resident memory (MiB) when the last block was done, before the
    #                                 parts were assembled into the file (report.peak_rss_mb: after)

    def to_dict(self) -> dict:
        return {
            "max_memory_mb": None if self.max_memory is None else round(self.max_memory / MB, 1),
            "memory_estimate_mb": self.estimate.to_dict(),
            "spilled_mb": round(self.spilled_bytes / MB, 1),
            "blocks": len(self.block_seconds),
            "block_seconds": [{"block": n, "seconds": s, "rss_mb": round(r, 1)}
                              for (n, s), r in zip(self.block_seconds, self.block_rss_mb)],
            "out_of_core_seconds": self.seconds,
            "walk_peak_rss_mb": self.walk_peak_rss_mb,
        }


class _FolderWeights:
    """Loads and drops the weights of ``model`` and ``float_model`` (two meta-device copies of one
    architecture) from the folder's shards; parameters keep their identity (``swap_tensors``),
    so ties and the engine's maps of them stay valid."""

    def __init__(self, reader: ShardReader, model: nn.Module, float_model: nn.Module):
        self.reader = reader
        self.key: dict[str, str] = {}  # parameter name -> the name it is stored under in the shards
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            stored = next((n for n in names if n in reader), None)
            if stored is None:
                raise ValueError(f"{str(reader.folder)!r}: no tensor {names[0]!r} in its safetensors files")
            self.key.update({n: stored for n in names})
        self.resident: set[int] = set()  # ids of parameters loaded for the whole run

    @staticmethod
    def _swap(p: nn.Parameter, t: torch.Tensor) -> None:
        torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=p.requires_grad))

    def load_resident(self, model: nn.Module, float_model: nn.Module, blocks: list[str]) -> None:
        """Read every parameter outside ``blocks`` into both models (one copy, shared)."""
        inside = tuple(b + "." for b in blocks)
        fparams = dict(float_model.named_parameters(remove_duplicate=False))
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.startswith(inside) or not p.is_meta:
                continue
            t = self.reader.get(self.key[name])
            self._check(name, p, t)
            fp = fparams[name]
            self._swap(p, t)
            if fp.is_meta:
                self._swap(fp, t)
            self.resident.update({id(p), id(fp)})

    def resident_names(self, model: nn.Module) -> set[str]:
        """Names (all of them, ties included) of the parameters loaded for the whole run."""
        return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in self.resident}

    def _check(self, name: str, p: torch.Tensor, t: torch.Tensor) -> None:
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{str(self.reader.folder)!r}: tensor {self.key[name]!r} has shape {tuple(t.shape)}, "
                             f"the architecture's {name!r} is {tuple(p.shape)}")

    def load(self, name: str, fblock: nn.Module | None, qblock: nn.Module | None) -> None:
        ref = qblock if qblock is not None else fblock
        fparams = dict(fblock.named_parameters(remove_duplicate=False)) if fblock is not None else {}
        for pname, p in ref.named_parameters(remove_duplicate=False):
            if id(p) in self.resident or not p.is_meta:
                continue
            full = f"{name}.{pname}"
            t = self.reader.get(self.key[full])
            self._check(full, p, t)
            if qblock is not None and fblock is not None:
                self._swap(fparams[pname], t)
                t = t.clone()
            self._swap(p, t)
        for block in (fblock, qblock):
            for bname, b in (block.named_buffers() if block is not None else ()):
                if f"{name}.{bname}" in self.reader:
                    b.copy_(self.reader.get(f"{name}.{bname}"))

    def drop(self, name: str, block: nn.Module) -> None:
        for p in block.parameters():
            if id(p) not in self.resident and not p.is_meta:
                self._swap(p, torch.empty_like(p, device="meta"))
        for m in block.modules():
            if hasattr(m, "qweight"):
                del m.qweight


def _estimate(model: nn.Module, blocks: list[str], tokens: int, batch_tokens: int) -> MemoryEstimate:
    """The expected peak of a run on ``model`` (parameters on the meta device: only shapes are read)
    with ``tokens`` calibration tokens in batches of ``batch_tokens``; activations filled in later."""
    inside = tuple(b + "." for b in blocks)
    seen, resident, per_block = set(), 0, dict.fromkeys(blocks, 0)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = 4 * p.numel()
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None or not name.startswith(inside):
            resident += n
        else:
            per_block[block] += n
    layers = [m for _, m in quantizable_layers(model)]
    n0 = max((m.weight[0].numel() for m in layers), default=0)
    widest_out = max((m.weight.shape[0] for m in layers), default=0)
    inputs = max((sum(m.weight[0].numel() for _, m in quantizable_layers(model.get_submodule(b))) for b in blocks),
                 default=0)
    hidden = max((m.weight.shape[1] for m in layers if isinstance(m, nn.Linear)), default=0)
    work = 4 * tokens * inputs + 2 * 4 * tokens * hidden + 4 * batch_tokens * widest_out
    return MemoryEstimate(base=int(current_rss_mb() * MB), resident=resident,
                          blocks=2 * max(per_block.values(), default=0), statistics=10 * 8 * n0 * n0, work=work,
                          activations=0)


def quantize_folder(folder, config: QuantConfig, calib, out, *, max_memory=None, activation_budget=None,
                    batch_size: int = 128, progress: bool = True, workdir=None, meta: dict | None = None
                    ) -> OutOfCoreResult:
    """Quantize the Hugging Face causal-LM ``folder`` block by block and write the packed file ``out``.

    Args:
        folder: a folder with ``config.json`` and ``*.safetensors`` shards (an index for several).
        config: the method config (AWQ is refused: it needs the whole float model first).
        calib: calibration token windows (N, T) (or anything ``specquant.quantize`` takes).
        out: the specquant file to write (whole or nothing).
        max_memory: a limit (bytes, or ``"3GB"``, ``"500MB"``, ``"2GiB"``); the run is refused with
            one line when the expected peak (:class:`MemoryEstimate`) exceeds it. None: no limit.
        activation_budget: bytes of cached activations kept in memory (beyond: memory-mapped files
            in a private temporary folder); default: half the room the limit leaves, all without one.
        batch_size: calibration samples per forward pass (as ``specquant.quantize``).
        workdir: where the private temporary folder goes (default: the system's).
        meta: free JSON-able information for the file's header.

    Load the file with ``specquant.load(out, build=...)`` (the folder's architecture builder).
    """
    t_start = time.perf_counter()
    limit = None if max_memory is None else parse_memory(max_memory)
    release_freed_memory()
    folder = Path(folder).expanduser().resolve()
    reader = ShardReader(folder)
    model = build_empty(folder)
    conv1d = next((n for n, m in model.named_modules() if is_hf_conv1d(m)), None)
    if conv1d is not None:
        raise ValueError(f"layer '{conv1d}' is a transformers Conv1D (GPT-2 style): out-of-core quantization reads "
                         "nn.Linear weights only; quantize this model in memory")
    float_model = copy.deepcopy(model)
    weights = _FolderWeights(reader, model, float_model)
    blocks = streamed_blocks(model)
    batches = as_batches(calib, batch_size)
    tokens = sum(b.numel() for b in batches)
    est = _estimate(model, blocks, tokens, max(b.numel() for b in batches))
    room = None if limit is None else limit - est.total  # what the limit leaves for cached activations
    if activation_budget is None:
        activation_budget = max(0, room // 2) if room is not None else 2**62
    activation_budget = int(activation_budget)
    est.activations = activation_budget if room is not None else 0
    if limit is not None and est.total > limit:
        raise ValueError(f"--max-memory {limit / MB:.0f} MiB cannot be met: this model needs about {est.text()}")
    weights.load_resident(model, float_model, blocks)
    tmp = Path(tempfile.mkdtemp(prefix="specquant-ooc-", dir=workdir))
    try:
        store = ActivationStore(tmp, int(activation_budget))
        writer = PartsWriter(Path(out), tmp, {"zoo_id": None, "arch": None},
                             {"hf_folder": str(folder), **(meta or {})})
        mine = weights.resident_names(model)  # a tied parameter is written (or recorded as tied) with the residents
        io = BlockIO(load=weights.load, drop=weights.drop,
                     save=lambda name, block: writer.add_module(block, name + ".", keep=lambda k: k not in mine))
        streamed = quantize_streamed(model, float_model, config, batches, io, store, batch_size=batch_size,
                                     progress=progress)
        for name in blocks:  # blocks after the last quantized layer: their float weights, copied through
            if name not in streamed.blocks:
                block = model.get_submodule(name)
                weights.load(name, None, block)
                io.save(name, block)
                weights.drop(name, block)
        inside = tuple(b + "." for b in blocks)
        writer.add_module(model, "", keep=lambda k: k in mine or not k.startswith(inside))
        path = writer.finish([n for n, _ in model.named_modules()])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = streamed.report
    walk_peak = report.peak_rss_mb
    report.peak_rss_mb = peak_rss_mb()
    return OutOfCoreResult(report=report, path=path, max_memory=limit, estimate=est,
                           block_seconds=streamed.block_seconds, block_rss_mb=streamed.block_rss_mb,
                           spilled_bytes=streamed.spilled_bytes,
                           seconds=time.perf_counter() - t_start, walk_peak_rss_mb=walk_peak)
