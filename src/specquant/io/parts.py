"""A packed specquant file written block by block, for models that are never whole in memory.

:class:`PartsWriter` takes one quantized block at a time (its layer records and tensors, as
:func:`specquant.io.format.save` would write them, plus the block's float tensors), writes its
tensors to a part file in a work folder and forgets them.  :meth:`PartsWriter.finish` assembles
the final file: the header is computed from the records (its payload SHA-256 is a fixed-length
field, so the safetensors header's size is known before any tensor is read), then the tensors
are copied from the parts one at a time in name order while the digest is fed, and the header is
written again with the digest.  The file goes through ``io/files.atomic_write_stream``: whole or
nothing.  It loads with :func:`specquant.io.format.load` like a file of ``save``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from specquant.io.files import atomic_write_stream
from specquant.io.format import (
    METADATA_KEY,
    digest_start,
    digest_tensor,
    float_entries,
    make_header,
    quantized_entries,
)

_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}  # safetensors' dtype names
_DIGEST_PLACEHOLDER = "0" * 64  # a SHA-256 in hex has 64 characters: the header's size does not change


@dataclass
class _Part:
    path: Path  # the part's safetensors file
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor name -> (dtype, shape)


@dataclass
class PartsWriter:
    """Collects a packed model block by block in ``workdir`` and writes it to ``path`` at the end."""

    path: Path  # the final file
    workdir: Path  # where the parts go (the caller removes it)
    model_info: dict  # the header's "model" (zoo id / architecture entry point)
    meta: dict | None = None  # the header's free "meta"
    scale_dtype: torch.dtype | None = None  # None: each layer's scales as quantized
    records: list[dict] = field(default_factory=list)  # layer records in the order given
    tied: dict[str, str] = field(default_factory=dict)  # float tensor names stored under another name
    parts: list[_Part] = field(default_factory=list)

    def add_module(self, module: nn.Module, prefix: str, keep=None) -> list[str]:
        """Add the quantized layers and the float tensors of ``module`` (named ``prefix`` + its own
        names; ``keep(key)`` selects the float tensors); returns the quantized layers' names."""
        layers, tensors, qnames = quantized_entries(module, self.scale_dtype, prefix)
        float_t, tied = float_entries(module, tuple(n + "." for n in qnames), prefix, keep)
        tensors.update(float_t)
        self.records.extend(layers)
        self.tied.update(tied)
        self._write_part(tensors)
        return qnames

    def _write_part(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        known = {k for p in self.parts for k in p.shapes}
        clash = sorted(set(tensors) & known)
        if clash:
            raise ValueError(f"tensor {clash[0]!r} is written twice")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = self.workdir / f"part-{len(self.parts):05d}.safetensors"
        save_file(tensors, str(path))
        self.parts.append(_Part(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}))

    def finish(self, module_order: list[str]) -> Path:
        """Write the file (records sorted by ``module_order``, the model's module names in order)."""
        from safetensors import safe_open

        rank = {n: i for i, n in enumerate(module_order)}
        records = sorted(self.records, key=lambda r: rank.get(r["name"], len(rank)))
        header = make_header(self.model_info, records, [], self.tied, self.meta, self.scale_dtype)
        header["payload_sha256"] = _DIGEST_PLACEHOLDER
        where = {k: p for p in self.parts for k in p.shapes}
        names = sorted(where)
        table, offset = {}, 0
        for k in names:
            dtype, shape = where[k].shapes[k]
            n = (torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            table[k] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n

        def st_header(h: dict) -> bytes:
            raw = json.dumps({"__metadata__": {METADATA_KEY: json.dumps(h, separators=(",", ":"))}, **table},
                             separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
            return struct.pack("<Q", len(raw)) + raw

        def write(f) -> None:
            first = st_header(header)
            f.write(first)
            h = digest_start(header)
            for k in names:
                with safe_open(str(where[k].path), framework="pt", device="cpu") as sf:
                    t = sf.get_tensor(k)
                digest_tensor(h, k, t)
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                del t
            header["payload_sha256"] = h.hexdigest()
            again = st_header(header)
            if len(again) != len(first):
                raise RuntimeError("the header changed size when its digest was filled in")
            f.seek(0)
            f.write(again)

        return atomic_write_stream(self.path, write)
