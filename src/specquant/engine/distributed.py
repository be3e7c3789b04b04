"""Data-parallel calibration over ranks of a ``torch.distributed`` process group.

Each rank holds the whole model and the whole calibration set, and streams the statistics of a
contiguous shard of the calibration batches (``shard_range``) through the same block-by-block walk
as one process (engine/apply.py).  Per layer:

1. every rank streams its shard's H = X̃ᵀX̃, G = X̃ᵀX, output energies and input sums as the nodes
   of the dyadic sum over batches (engine/treesum.py), and the nodes are exchanged
   (``Dist.combine``: each node broadcast from the rank that holds it), so every rank adds the
   same nodes in the same order and holds the *same* float64 statistics as one process would;
2. the algorithm runs on the layer's owner only (layers round-robin over ranks) and its
   ``QuantizedWeight`` (codes, scales, zero points, layout) is broadcast (``owned_method``): every
   rank installs the very same codes, also where ranks sit on machines whose BLAS or devices would
   round differently, and continues with its shard of the partly quantized model's inputs;
3. the error report and bias correction are computed by every rank from the same statistics.

The result equals the single-process result bit for bit for every method whose randomness lives in
the algorithm (seeded by ``config.seed``; it runs once, on the owner).  Refused with one line under
more than one rank: activation quantization (``act_bits``: a seeded sample of inputs drawn batch
by batch), AWQ and SmoothQuant (float-model pre-steps over all batches before the walk), and conv patch
subsampling (``patch_fraction`` < 1: one random stream through all batches).

A ``QuantizedWeight`` travels as JSON plus raw tensor bytes (``encode_result`` /
``decode_result``), never pickled: decoding builds only the classes of an allow-list (the weight,
its grid, granularity and layout classes) from plain data, so a peer cannot make a rank run code.
The rendezvous itself (gloo/NCCL) is not authenticated: keep it on a private network.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from specquant.algorithms.base import Method, QuantConfig, QuantContext
from specquant.engine.treesum import Key, Parts, cover


def shard_range(n_batches: int, rank: int, world: int) -> tuple[int, int]:
    """Batches [start, stop) of ``rank``: contiguous shards whose sizes differ by at most one."""
    return rank * n_batches // world, (rank + 1) * n_batches // world


def check_distributed(config: QuantConfig, patch_fraction: float, n_batches: int, world: int,
                      batch_size: int = 128) -> None:
    """One-line refusals of what does not split over ``world`` > 1 ranks exactly."""
    if world <= 1:
        return
    if config.act_bits is not None:
        raise ValueError(f"activation quantization (act_bits={config.act_bits}) samples inputs batch by batch "
                         f"and is not supported over {world} ranks; run it with one process")
    if getattr(config, "awq", False):
        raise ValueError(f"AWQ searches its scales over all calibration batches at once and is not supported over "
                         f"{world} ranks; run it with one process")
    if getattr(config, "smoothquant", None) is not None:
        raise ValueError(f"SmoothQuant reads its ranges over all calibration batches before the walk and is not "
                         f"supported over {world} ranks; run it with one process")
    if patch_fraction < 1.0:
        raise ValueError(f"patch_fraction={patch_fraction} draws one random stream through all batches and is not "
                         f"supported over {world} ranks; use patch_fraction=1 or one process")
    if n_batches < world:
        raise ValueError(f"{world} ranks need at least {world} calibration batches, got {n_batches} (of up to "
                         f"{batch_size} samples); give more samples or smaller batches (specquant quantize "
                         "--calib-batch B)")


@dataclass
class Dist:
    """This process's place in an initialised process group, and what it communicated."""

    rank: int  # this process's rank, 0..world-1
    world: int  # number of ranks
    device: torch.device = torch.device("cpu")  # where collective buffers live (a CUDA device under NCCL)
    sent_bytes: int = 0  # payload bytes this rank broadcast to the others (counted once per receiver)
    received_bytes: int = 0  # payload bytes this rank received
    comm_seconds: float = 0.0  # wall time inside broadcasts (transfer and waiting for the sender)

    @classmethod
    def current(cls) -> Dist:
        """The initialised default process group (``torch.distributed.init_process_group``)."""
        if not tdist.is_available() or not tdist.is_initialized():
            raise ValueError("torch.distributed is not initialised: call init_process_group first")
        device = torch.device("cpu")
        if tdist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(tdist.get_rank(), tdist.get_world_size(), device)

    def _broadcast(self, buf: torch.Tensor, src: int) -> torch.Tensor:
        """Broadcast ``buf`` (filled on ``src``) in place, counting its bytes."""
        nbytes = buf.numel() * buf.element_size()
        if self.rank == src:
            self.sent_bytes += nbytes * (self.world - 1)
        else:
            self.received_bytes += nbytes
        t0 = time.perf_counter()
        staged = buf.to(self.device)
        tdist.broadcast(staged, src=src)
        out = staged.to(buf.device)
        self.comm_seconds += time.perf_counter() - t0
        return out

    def broadcast_object(self, obj, src: int):
        """``obj`` (a layer's result: see ``encode_result``) from rank ``src`` on every rank."""
        if self.rank == src:
            meta, tensors = encode_result(obj)
            data = json.dumps(meta).encode()
            blob = tensor_bytes(tensors)
        size = self._broadcast(torch.tensor([len(data), blob.numel()] if self.rank == src else [0, 0],
                                            dtype=torch.int64), src)
        n_meta, n_blob = (int(v) for v in size.tolist())
        head = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src else \
            torch.empty(n_meta, dtype=torch.uint8)
        head = self._broadcast(head, src)
        body = self._broadcast(blob if self.rank == src else torch.empty(n_blob, dtype=torch.uint8), src)
        if self.rank == src:
            return obj
        return decode_result(json.loads(head.numpy().tobytes().decode()), body)

    def combine(self, n_batches: int):
        """The ``StreamOptions.combine`` of a run over ``n_batches`` batches: this rank's dyadic nodes
        in, every rank's nodes out (each broadcast from its holder, in rank and batch order)."""
        def gather(nodes: dict[Key, Parts]) -> dict[Key, Parts]:
            mine = cover(*shard_range(n_batches, self.rank, self.world))
            if sorted(nodes) != sorted(mine):
                raise ValueError(f"rank {self.rank}: streamed batches {sorted(nodes)} are not its shard {mine}")
            like = nodes[mine[0]]  # every node has the same parts, and every rank the same shapes
            sizes = [t.numel() for t in like]
            out: dict[Key, Parts] = {}
            for r in range(self.world):
                for key in cover(*shard_range(n_batches, r, self.world)):
                    if r == self.rank:
                        flat = torch.cat([t.reshape(-1) for t in nodes[key]])
                    else:
                        flat = torch.empty(sum(sizes), dtype=like[0].dtype, device=like[0].device)
                    flat = self._broadcast(flat, r)
                    out[key] = [p.reshape(t.shape) for p, t in zip(flat.split(sizes), like)]
            return out
        return gather

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``t`` over all ranks (a new tensor; its bytes counted as received
        once per other rank).  Exact where at most one rank holds a nonzero entry."""
        nbytes = t.numel() * t.element_size()
        self.sent_bytes += nbytes * (self.world - 1)
        self.received_bytes += nbytes * (self.world - 1)
        t0 = time.perf_counter()
        staged = t.detach().clone().to(self.device)
        tdist.all_reduce(staged)
        self.comm_seconds += time.perf_counter() - t0
        return staged.to(t.device)

    def sum_int(self, value: int) -> int:
        """The sum of ``value`` over all ranks (not counted as payload)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t)
        return int(t.item())


def owned_method(method: Method, dist: Dist, layer_order: list[str]) -> Method:
    """``method`` whose ``quantize_weight`` runs on the layer's owner (layer k of ``layer_order`` on
    rank k mod world) and whose result every rank receives."""
    index = {name: k for k, name in enumerate(layer_order)}
    run = method.quantize_weight

    def quantize_weight(W: torch.Tensor, stats, config: QuantConfig, ctx: QuantContext):
        owner = index.get(ctx.layer, 0) % dist.world
        result = None
        error = None
        if dist.rank == owner:
            try:
                result = run(W, stats, config, ctx)
            except ValueError as e:  # every rank raises the same one line
                error = str(e)
        result, error = dist.broadcast_object((result, error), owner)
        if error is not None:
            raise ValueError(error)
        return result

    return dataclasses.replace(method, quantize_weight=quantize_weight)


def default_timeout(seconds: float) -> datetime.timedelta:
    """A collective timeout of ``seconds`` (positive) for ``init_process_group``."""
    if not seconds > 0:
        raise ValueError(f"the collective timeout must be positive seconds, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def _allowed_classes() -> dict[str, type]:
    """The classes a rank may build from a peer's message, by qualified name."""
    from specquant.core.grid import FP8Format, Granularity, GridSpec
    from specquant.core.layouts import Layout, registered_layouts
    from specquant.core.qweight import FrameQuantizedWeight, QuantizedWeight

    classes = {QuantizedWeight, FrameQuantizedWeight, GridSpec, Granularity, FP8Format, Layout,
               *registered_layouts()}
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def encode_result(obj) -> tuple[object, list[torch.Tensor]]:
    """``obj`` as JSON-able data and a list of tensors: None, bools, numbers, strings, lists, tuples,
    string-keyed dicts, tensors, dtypes and instances of the allow-listed classes (their
    attributes); anything else is a ValueError."""
    allowed = {c: n for n, c in _allowed_classes().items()}
    tensors: list[torch.Tensor] = []

    def enc(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return {"list" if isinstance(x, list) else "tuple": [enc(v) for v in x]}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise ValueError("a layer result holds a dict with non-string keys")
            return {"dict": {k: enc(v) for k, v in x.items()}}
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            tensors.append(t)
            return {"tensor": [str(t.dtype).removeprefix("torch."), list(t.shape)]}
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        name = allowed.get(type(x))
        if name is None:
            raise ValueError(f"a layer result holds a {type(x).__name__}, which ranks do not exchange")
        return {"object": name, "attrs": {k: enc(v) for k, v in vars(x).items()}}

    try:
        return enc(obj), tensors
    finally:
        enc = None  # the closure calls itself (a reference cycle): unbound, the tensors are freed at once


def tensor_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, one after another (1-D uint8), as ``decode_result`` reads them."""
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])


def decode_result(meta, blob: torch.Tensor):
    """Inverse of ``encode_result``: ``meta`` (parsed JSON) and the tensors' bytes back to the object.
    Only allow-listed classes are built (``__new__`` and their attributes, no code of the message)."""
    allowed = _allowed_classes()
    offset = 0

    def dtype_of(name) -> torch.dtype:
        dt = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"a peer rank sent an unknown dtype {name!r}")
        return dt

    def dec(x):
        nonlocal offset
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if not (isinstance(x, dict) and len(x) in (1, 2)):
            raise ValueError("a peer rank sent a malformed layer result")
        if "list" in x or "tuple" in x:
            items = [dec(v) for v in x.get("list", x.get("tuple"))]
            return items if "list" in x else tuple(items)
        if "dict" in x:
            return {str(k): dec(v) for k, v in x["dict"].items()}
        if "dtype" in x:
            return dtype_of(x["dtype"])
        if "tensor" in x:
            name, shape = x["tensor"]
            dt = dtype_of(name)
            n = math.prod(int(d) for d in shape) * torch.empty(0, dtype=dt).element_size()
            if offset + n > blob.numel():
                raise ValueError("a peer rank sent fewer tensor bytes than its layer result describes")
            t = blob[offset:offset + n].clone().view(dt).reshape([int(d) for d in shape])
            offset += n
            return t
        if "object" in x:
            cls = allowed.get(x["object"])
            if cls is None:
                raise ValueError(f"a peer rank sent an object of class {x['object']!r}, which ranks do not exchange")
            out = cls.__new__(cls)
            out.__dict__.update({str(k): dec(v) for k, v in x["attrs"].items()})
            return out
        raise ValueError("a peer rank sent a malformed layer result")

    try:
        obj = dec(meta)
    finally:
        dec = None  # the closure calls itself (a reference cycle holding ``blob``): unbound, it is freed at once
    if offset != blob.numel():
        raise ValueError("a peer rank sent more tensor bytes than its layer result describes")
    return obj
