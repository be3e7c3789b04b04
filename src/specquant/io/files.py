"""Writing files and strict JSON: the one atomic writer and the one JSON helper of specquant.

:func:`atomic_write_bytes` writes through a temporary file in the same folder
(``.NAME.<random>.tmp``), fsyncs it, gives it the mode an ordinary new file gets (``0o666``
less the umask; ``mkstemp`` creates ``0o600``), renames it over the target with ``os.replace``
and fsyncs the folder where the platform allows it. A write that fails at any point (Ctrl-C
included) removes the temporary file and leaves the old file as it was, so readers see either
the old bytes or the new ones, never a mix.

:func:`jsonable` turns results into what strict JSON can hold (non-finite floats become
``null``); :func:`dumps`/:func:`write_json` never write ``NaN``/``Infinity``, and :func:`loads`/
:func:`read_json` refuse them. This module sits in ``io`` and imports nothing of specquant.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes", "atomic_write_stream", "atomic_write_text", "dumps", "fsync_dir", "jsonable", "loads",
    "read_json", "write_json",
]


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux ≥ 4.7);
    elsewhere by setting and restoring it, as ``os.umask`` only allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make a rename in the folder ``path`` durable where the platform allows it (best effort:
    folders cannot be opened or fsynced everywhere, and then this does nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); creates missing parent
    folders. Returns ``path`` as a :class:`~pathlib.Path`."""
    return atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_stream(path: str | Path, write) -> Path:
    """Like :func:`atomic_write_bytes`, for content too large to hold at once: ``write(f)`` writes
    it piece by piece into the open temporary file ``f`` (binary, seekable)."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------


def jsonable(obj):
    """A copy of ``obj`` that strict JSON can hold.

    Mappings become dicts with string keys (``str(key)``), lists/tuples/sets lists, non-finite
    floats ``None``, tensors and NumPy arrays (nested) lists, NumPy scalars plain numbers, paths
    strings; ``None``, bools, ints, finite floats and strings stay as they are; anything else
    becomes ``str(obj)``.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):  # NumPy scalars
        return jsonable(obj.item())
    return str(obj)


def dumps(obj, indent: int | None = 2) -> str:
    """Strict JSON text of :func:`jsonable` (``obj``): no NaN/Infinity, keys in insertion order."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """:func:`dumps` (``obj``) and a newline, written atomically to ``path``."""
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads(text: str | bytes):
    """``json.loads`` that refuses NaN/Infinity/-Infinity; every failure is a ValueError (a
    document nested too deeply included)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: str | Path):
    """The strict JSON document in the UTF-8 file ``path`` (:func:`loads`)."""
    with open(path, encoding="utf-8") as f:
        return loads(f.read())
