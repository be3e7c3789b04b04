"""Corrupted specquant files, for testing that ``load`` refuses them cleanly.

``mutate(draw, data)`` turns the bytes of a good file into a damaged one the way an attacker
or a broken disk would: truncations, byte flips, appended bytes, edits of the specquant header
with a recomputed checksum (values replaced by other JSON of any type, keys deleted or added,
the architecture pointed at other code), edits of the tensors with a recomputed checksum
(NaN/negative scales, other dtypes or shapes, missing or extra tensors) and edits of the
safetensors tensor table.  ``draw`` is Hypothesis's ``data.draw``, so the same generator serves
the test suite (few cases) and ``benchmarks/fuzz_loader.py`` (many).  ``outcome`` classifies
what loading the result did: a clear one-line ``SQFormatError``, a model that loads and runs,
or anything else (a failure).

Hypothesis is a development dependency: this module imports it only when called.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specquant.io.format import METADATA_KEY, SQFormatError, payload_digest

# Entry points a hostile file might name: each would run code if a loader imported it blindly.
HOSTILE_ENTRY_POINTS = ("os:abort", "os:getcwd", "builtins:exit", "subprocess:Popen", "pdb:set_trace",
                        "antigravity:geohash", "this:s", "sys:exit", "code:interact", "os.path:expanduser")


@dataclass
class Outcome:
    """What ``load`` did with one corrupted file."""

    kind: str  # "clear" (one-line SQFormatError), "loaded" (loaded and ran), "other" (a failure)
    mutation: str  # which corruption was applied
    message: str  # the error's text (first line) or ""


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _frame(st_header: dict, payload: bytes) -> bytes:
    text = json.dumps(st_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def _json_values():
    from hypothesis import strategies as st

    leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 8, 9, 255, 2**31])
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
              | st.sampled_from(["float32", "float16", "uint8", "Linear", "Conv2d", "frame", "uniform", "rows",
                                 "trits", "bits", "group:4", "group:5", "group:1000", "channel", "tensor",
                                 "asymmetric", "narrow"]))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                      max_size=4), max_leaves=8)


def _paths(obj, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _edit_header(draw, header: dict) -> str:
    """Change one place of the specquant header in place; returns a label."""
    from hypothesis import strategies as st

    paths = [p for p in _paths(header) if p and p[0] != "payload_sha256"]
    path = draw(st.sampled_from(paths))
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    what = draw(st.sampled_from(["replace", "delete", "add", "hostile-arch", "zoo-id"]))
    if what == "hostile-arch":
        header["model"] = {"zoo_id": None, "arch": draw(st.sampled_from(HOSTILE_ENTRY_POINTS))}
        return "header: hostile entry point"
    if what == "zoo-id":
        header["model"] = {"zoo_id": draw(st.text(max_size=20)), "arch": None}
        return "header: other zoo id"
    if what == "delete" and isinstance(parent, (dict, list)):
        del parent[path[-1]]
        return f"header: delete {'/'.join(map(str, path))}"
    if what == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(_json_values())
        return f"header: add a key beside {'/'.join(map(str, path))}"
    parent[path[-1]] = draw(_json_values())
    return f"header: replace {'/'.join(map(str, path))}"


def _edit_tensors(draw, tensors: dict[str, torch.Tensor]) -> str:
    from hypothesis import strategies as st

    names = sorted(tensors)
    name = draw(st.sampled_from(names))
    t = tensors[name]
    what = draw(st.sampled_from(["nan", "inf", "negative", "dtype", "shape", "drop", "extra"]))
    if what in ("nan", "inf", "negative") and t.is_floating_point() and t.numel():
        t = t.clone()
        i = draw(st.integers(0, t.numel() - 1))
        t.view(-1)[i] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[what]
        tensors[name] = t
        return f"tensor: {what} in {name}"
    if what == "dtype":
        dt = draw(st.sampled_from([torch.float32, torch.float16, torch.uint8, torch.int64, torch.float64]))
        tensors[name] = t.to(dt)
        return f"tensor: {name} as {dt}"
    if what == "shape":
        n = draw(st.integers(0, 2 * t.numel() + 2))
        tensors[name] = torch.zeros(n, dtype=t.dtype)
        return f"tensor: {name} reshaped to ({n},)"
    if what == "drop":
        del tensors[name]
        return f"tensor: drop {name}"
    tensors[draw(st.sampled_from([name + "x", "extra", name.rpartition(".")[0] + ".weight"]))] = torch.zeros(3)
    return "tensor: extra tensor"


def _edit_table(draw, st_header: dict) -> str:
    from hypothesis import strategies as st

    names = sorted(k for k in st_header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    st_header[name][field] = draw(_json_values() | st.lists(st.integers(-5, 2**62), max_size=3))
    return f"table: {name}.{field}"


def mutate(draw, data: bytes) -> tuple[str, bytes]:
    """One corruption of the good file ``data``: (label, new bytes)."""
    from hypothesis import strategies as st
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    kind = draw(st.sampled_from(["truncate", "flip", "append", "header", "header", "header", "tensors",
                                 "tensors", "table"]))
    if kind == "truncate":
        keep = draw(st.integers(0, len(data) - 1))
        return f"truncate to {keep} bytes", data[:keep]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return "flip bytes", bytes(out)
    if kind == "append":
        return "append bytes", data + draw(st.binary(min_size=1, max_size=64))
    st_header, payload = _split(data)
    if kind == "table":
        label = _edit_table(draw, st_header)
        return label, _frame(st_header, payload)
    header = json.loads(st_header["__metadata__"][METADATA_KEY])
    tensors = st_load(data)
    label = _edit_header(draw, header) if kind == "header" else _edit_tensors(draw, tensors)
    if draw(st.booleans()) or kind == "tensors":  # an attacker recomputes the checksum
        header["payload_sha256"] = payload_digest(header, tensors)
    return label, st_save(tensors, metadata={METADATA_KEY: json.dumps(header)})


def outcome(path, load: Callable, example: torch.Tensor, label: str) -> Outcome:
    """Load ``path`` with ``load`` and run the model on ``example``; classify what happened."""
    try:
        model = load(path)
    except SQFormatError as e:
        text = str(e)
        if "\n" in text.strip() or not text.strip():
            return Outcome("other", label, f"SQFormatError not one line: {text[:200]!r}")
        return Outcome("clear", label, text)
    except Exception as e:  # noqa: BLE001 - anything else is what the fuzzing looks for
        return Outcome("other", label, f"{type(e).__name__}: {str(e)[:200]}")
    try:
        with torch.inference_mode():
            y = model(example)
    except Exception as e:  # noqa: BLE001
        return Outcome("other", label, f"loaded, then the forward pass failed: {type(e).__name__}: {str(e)[:200]}")
    if not bool(torch.isfinite(y).all()):
        return Outcome("other", label, "loaded, then the forward pass gave NaN or infinite outputs")
    return Outcome("loaded", label, "")
