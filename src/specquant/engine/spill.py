"""Cached block inputs held in memory up to a budget and beyond it in memory-mapped files.

The engine caches, per calibration batch, the (args, kwargs) a block is called with; the first
argument (the hidden states, (B, T, d)) is what grows with the calibration set.  An
:class:`ActivationStore` keeps such lists in memory while their hidden states fit in its byte
budget and otherwise writes the hidden states to a ``numpy.memmap`` file in its folder, handing
back a :class:`SpilledInputs` sequence that reads one batch back at a time (the other
arguments: masks, position embeddings, stay in memory; they are shared by every block).  The
values read back are the very bytes written, so the walk computes the same numbers either way.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


def inputs_nbytes(items) -> int:
    """Bytes of the first argument of each cached (args, kwargs)."""
    return sum(a[0].numel() * a[0].element_size() for a, _ in items if a and isinstance(a[0], torch.Tensor))


class SpilledInputs(Sequence):
    """Cached (args, kwargs) per batch whose first argument lives in a memory-mapped file."""

    def __init__(self, path: Path, items: list):
        self.path = path
        self._meta = []  # per batch: (offset in bytes, shape, dtype, other args, kwargs)
        offset = 0
        for args, kwargs in items:
            t = args[0].detach().contiguous()
            self._meta.append((offset, tuple(t.shape), t.dtype, args[1:], kwargs))
            offset += t.numel() * t.element_size()
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(offset, 1),))
        for (off, _, _, _, _), (args, _) in zip(self._meta, items):
            b = args[0].detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            mm[off:off + b.size] = b
        mm.flush()
        del mm
        self.nbytes = offset

    def __len__(self) -> int:
        return len(self._meta)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        off, shape, dtype, rest, kwargs = self._meta[i]
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=off, shape=(n,)) if n else np.empty(0, np.uint8)
        t = torch.from_numpy(np.array(mm)).view(dtype).reshape(shape)  # a copy: nothing stays mapped
        del mm
        return (t, *rest), kwargs


@dataclass
class ActivationStore:
    """Cached block inputs: in memory up to ``budget`` bytes, beyond it in files under ``folder``."""

    folder: Path  # a private folder the caller creates and removes (on success and on failure)
    budget: int  # bytes of hidden states held in memory at once
    held: dict[str, int] = field(default_factory=dict)  # key -> bytes it holds in memory
    spilled_bytes: int = 0  # bytes written to disk so far (a report figure)
    _count: int = 0

    def put(self, key: str, items: list | None):
        """Keep ``items`` under ``key`` (replacing what ``key`` held); returns the sequence to use."""
        self.drop(key)
        if items is None:
            return None
        n = inputs_nbytes(items)
        if sum(self.held.values()) + n <= self.budget:
            self.held[key] = n
            return items
        self._count += 1
        path = self.folder / f"{key}-{self._count:05d}.bin"
        spilled = SpilledInputs(path, items)
        self.spilled_bytes += spilled.nbytes
        return spilled

    def drop(self, key: str) -> None:
        """Forget what ``key`` holds in memory (its file, if any, goes when the sequence is replaced)."""
        self.held.pop(key, None)
        for old in self.folder.glob(f"{key}-*.bin"):
            old.unlink(missing_ok=True)
