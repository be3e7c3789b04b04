"""The packed model format: one safetensors file, a JSON header in its metadata, no pickle.

Tensors
    ``<layer>.codes``       uint8, 1-D: the layer's codes bit-packed by ``specquant.core.pack``
                            (ceil(numel·bits/8) bytes; at 8 bits the codes themselves)
    ``<layer>.scale``       one scale per block, ``granularity.scale_shape``; float32 unless the
                            file was saved with ``scale_dtype="fp16"`` (stated per layer)
    ``<layer>.zero_point``  only when the grid does not fix it (asymmetric grids): uint8 when every
                            zero point is an integer in 0..255, else float32
    ``<layer>.bias``        the layer's float bias, when it has one
    ``<layer>.row_bits``    uint8 (out,): each output row's width, when rows mix widths ("rows" packing)
    every other entry of the model's ``state_dict()`` (biases, BatchNorm parameters and
    statistics, parameters of layers left in float), under its own name and dtype.

Header: the safetensors metadata maps ``"specquant"`` to a JSON object::

    {"format": "specquant", "version": 1, "specquant_version": "0.1.0",
     "model": {"zoo_id": "resnet20-cifar10" | null, "arch": "package.module:function" | null},
     "quantized": true, "scale_dtype": "float32",
     "layers": [{"name", "type" (Linear/Conv1d/Conv2d), "kind" ("uniform" | "frame"), "bits",
                 "grid", "levels", "granularity" ("tensor"/"channel"/"group:G"), "axis",
                 "shape", "codes_shape", "dtype", "scale_dtype", "zero_point"
                 ("implicit"/"uint8"/"float32"), "bias", "algorithm", "info", "frame" (frame kind:
                 kind, dim, size, seed, order, along), "packing" ("bits": codes bit-packed at
                 "bits" each; "trits": a 3-level grid's codes five per byte; "rows": per-row widths
                 in ``<layer>.row_bits``; absent means "bits", as files written before it)}, ...],
     "layer_defaults": {...},        fields shared by most layers, written once: a stored record
                                     is {**layer_defaults, **record} with null meaning "absent"
     "folded_bn": ["bn1", ...],      BatchNorms folded into convs: load replaces them by Identity
     "meta": {...},                  free JSON given to save(meta=...)
     "payload_sha256": "<hex>"}

``payload_sha256`` is the SHA-256 of the header without that field (canonical JSON: sorted keys,
compact separators) followed, for every tensor in name order, by ``name NUL dtype NUL shape NUL``
and the tensor's bytes.  ``load`` checks it, then checks that header and tensors agree (dtypes,
shapes, byte counts), so a truncated, altered or foreign file gives one ``SQFormatError`` line
(a ``ValueError``) and never a wrong model.

The architecture is rebuilt from the zoo id (``ZooEntry.build``: architecture only, fresh
weights, no training and no data) or from the entry point ``"module:function"`` (imported and
called with no arguments: only load files whose entry point you trust).  A file saved from a
float model has no quantized layers and loads as that float model.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from specquant.core.grid import Granularity, GridSpec
from specquant.core.pack import PACKINGS, layout_nbytes, packing_for
from specquant.nn.layers import (
    FRAME_KEYS,
    WEIGHT_KINDS,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    _QuantLayer,
    _set_module,
    quant_layer_class,
    wants_int8,
)

FORMAT_NAME = "specquant"
FORMAT_VERSION = 1
METADATA_KEY = "specquant"
SCALE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                "float16": torch.float16}
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}
_LAYER_TYPES = {"Linear": QuantLinear, "Conv2d": QuantConv2d, "Conv1d": QuantConv1d}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header size


class SQFormatError(ValueError):
    """A file that is not a valid specquant model (one line naming the problem)."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _jsonable(v):
    """A JSON-safe copy of an algorithm's ``info`` (tensors become lists or a description)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 16 else f"tensor{tuple(v.shape)}"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def payload_digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the header without ``payload_sha256`` and of every tensor, in name order."""
    h = hashlib.sha256()
    h.update(_canonical({k: v for k, v in header.items() if k != "payload_sha256"}))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


def _resolve_entry_point(arch: str) -> Callable[[], nn.Module]:
    mod_name, sep, attr = arch.partition(":")
    if not sep or not mod_name or not attr:
        raise SQFormatError(f"architecture entry point {arch!r} is not of the form 'module:function'")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SQFormatError(f"cannot import the architecture entry point {arch!r}: {e}") from None
    if not callable(obj):
        raise SQFormatError(f"architecture entry point {arch!r} is not callable")
    return obj


def _arch_string(arch) -> str | None:
    if arch is None or isinstance(arch, str):
        return arch
    if callable(arch):
        s = f"{arch.__module__}:{arch.__qualname__}"
        if "<" in s:
            raise ValueError(f"architecture {arch!r} has no importable name; pass 'module:function'")
        return s
    raise ValueError(f"arch must be 'module:function' or a function, got {type(arch).__name__}")


def _call_builder(fn: Callable[[], nn.Module], what: str) -> nn.Module:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of the builder is one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SQFormatError(f"cannot build the architecture ({what}): {type(e).__name__}: {first}") from None


def build_skeleton(model_info: dict, data_dir=None) -> nn.Module:
    """The float architecture (fresh weights, eval mode) named by a header's ``model`` entry.

    ``data_dir`` is accepted for zoo entries whose build might need it; none does today.
    """
    zoo_id, arch = model_info.get("zoo_id"), model_info.get("arch")
    if zoo_id is not None:
        from specquant.models.zoo import get_entry

        try:
            entry = get_entry(zoo_id)
        except ValueError as e:
            raise SQFormatError(str(e)) from None
        model = _call_builder(entry.build, f"zoo id {zoo_id!r}")
    elif arch is not None:
        model = _call_builder(_resolve_entry_point(arch), f"entry point {arch!r}")
        if not isinstance(model, nn.Module):
            raise SQFormatError(f"architecture entry point {arch!r} returned {type(model).__name__}, "
                                f"not a module")
    else:
        raise SQFormatError("the header names neither a zoo id nor an architecture entry point")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _quantized_source(mod: nn.Module):
    """The packed layer or the QuantizedWeight of a quantized module, else None."""
    if isinstance(mod, _QuantLayer):
        return mod
    qw = getattr(mod, "qweight", None)
    return qw


def _layer_entry(name: str, mod: nn.Module, src, scale_dtype: torch.dtype) -> tuple[dict, dict]:
    """Header record and tensors of one quantized layer."""
    if isinstance(src, _QuantLayer):
        layer = src
    else:
        try:
            layer = quant_layer_class(mod).from_quantized(mod, src)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e}") from None
    scale = layer.scale
    if scale_dtype == torch.float16 and scale.dtype != torch.float16:
        s16 = scale.to(torch.float16)
        # rounding is the point of fp16 (relative error ≤ 2^-11, more for scales below 6.1e-5, which
        # fp16 holds as subnormals); overflow, or a used scale becoming 0, would break the layer
        bad = ~torch.isfinite(s16) | ((s16 == 0) & (scale != 0))
        if bool(bad.any()):
            raise ValueError(f"layer '{name}': its scales do not fit in fp16 (overflow or underflow to 0); "
                             f"save with scale_dtype='fp32'")
        scale = s16
    elif scale_dtype == torch.float32:
        scale = scale.float()
    tensors = {f"{name}.codes": layer.packed_codes().contiguous(), f"{name}.scale": scale.contiguous()}
    if layer.zero_point is None:
        zp_kind = "implicit"
    else:
        zp = layer.zero_point
        if bool(((zp >= 0) & (zp <= 255) & (zp == zp.round())).all()):
            zp_kind = "uint8"
            tensors[f"{name}.zero_point"] = zp.to(torch.uint8).contiguous()
        else:
            zp_kind = "float32"
            tensors[f"{name}.zero_point"] = zp.float().contiguous()
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().contiguous()
    if layer.row_bits is not None:
        tensors[f"{name}.row_bits"] = layer.row_bits.contiguous()
    g = layer.granularity
    rec = {
        "name": name, "type": layer.layer_type, "kind": layer.kind, "bits": layer.bits,
        "grid": layer.spec.kind, "levels": layer.spec.levels, "granularity": g.label(),
        "shape": list(layer.weight_shape), "dtype": _dtype_name(layer.weight_dtype),
        "scale_dtype": _dtype_name(scale.dtype), "zero_point": zp_kind,
        "bias": layer.bias is not None, "algorithm": layer.algorithm, "info": _jsonable(layer.info),
        "packing": layer.packing,
    }
    if g.kind == "channel":
        rec["axis"] = g.axis
    if layer.kind == "frame":
        rec["frame"] = dict(layer.frame)
        rec["codes_shape"] = list(layer.codes_shape)
    return rec, tensors


_OWN_FIELDS = ("name", "shape")  # never shared through layer_defaults


def _compact_layers(records: list[dict]) -> tuple[dict, list[dict]]:
    """Move each field that most layers share into ``layer_defaults`` (keeps the header small)."""
    keys = sorted({k for r in records for k in r} - set(_OWN_FIELDS))
    defaults = {}
    for k in keys:
        counts: dict[str, int] = {}
        for r in records:
            if k in r:
                c = json.dumps(r[k], sort_keys=True)
                counts[c] = counts.get(c, 0) + 1
        best, n = max(counts.items(), key=lambda kv: kv[1])
        if n >= 2:
            defaults[k] = json.loads(best)
    compact = []
    for r in records:
        c = {k: v for k, v in r.items() if k in _OWN_FIELDS or k not in defaults or defaults[k] != v}
        c.update({k: None for k in defaults if k not in r})
        compact.append(c)
    return defaults, compact


def expand_layers(header: dict) -> list[dict]:
    """The full per-layer records of a header (``layer_defaults`` merged in)."""
    defaults = header.get("layer_defaults") or {}
    layers = header.get("layers")
    if not isinstance(defaults, dict) or not isinstance(layers, list):
        raise SQFormatError("corrupted header: 'layers' or 'layer_defaults' is malformed")
    out = []
    for r in layers:
        if not isinstance(r, dict):
            raise SQFormatError(f"corrupted header: bad layer record {str(r)[:80]!r}")
        out.append({k: v for k, v in {**defaults, **r}.items() if v is not None})
    return out


def _folded_bns(model: nn.Module, skeleton: nn.Module) -> list[str]:
    """BatchNorms of the architecture that the model has replaced by Identity (folded)."""
    mods = dict(model.named_modules())
    folded = []
    for name, sk in skeleton.named_modules():
        if isinstance(sk, nn.modules.batchnorm._BatchNorm) and isinstance(mods.get(name), nn.Identity):
            folded.append(name)
    return folded


def save(model: nn.Module, path, *, model_id: str | None = None, arch=None, meta: dict | None = None,
         scale_dtype: str = "fp32") -> Path:
    """Write ``model`` (quantized by ``specquant.quantize``, converted, loaded, or float) to ``path``.

    Args:
        model: the model; modules with ``.qweight`` or packed layers are written as packed codes.
        path: the file to write (atomically: temporary file in the same folder, fsync, rename).
        model_id: zoo id that rebuilds the architecture (``specquant.models.list_models()``).
        arch: else an entry point ``"module:function"`` (or the function) that builds it.
            Either defaults to what ``load`` recorded on a loaded model.
        meta: free JSON-able information kept in the header (e.g. the quantization report);
            defaults to the meta of the file a loaded model came from.
        scale_dtype: ``"fp32"`` (default: loads bit-identical) or ``"fp16"`` (half the scale
            bytes; the loaded model then uses the fp16-rounded scales).
    Returns the path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be 'fp32' or 'fp16', got {scale_dtype!r}")
    sdt = SCALE_DTYPES[scale_dtype]
    model_id = model_id if model_id is not None else getattr(model, "_specquant_model_id", None)
    arch = _arch_string(arch if arch is not None else getattr(model, "_specquant_arch", None))
    if model_id is None and arch is None:
        raise ValueError("save needs model_id= (a zoo id) or arch= ('module:function') so that load can "
                         "rebuild the architecture")
    if meta is None:  # a loaded model keeps the meta of its file
        meta = (getattr(model, "specquant_header", None) or {}).get("meta")
    model_info = {"zoo_id": model_id, "arch": arch}
    try:
        skeleton = build_skeleton(model_info)
    except SQFormatError as e:
        raise ValueError(str(e)) from None
    folded = _folded_bns(model, skeleton)

    layers, tensors, qnames = [], {}, []
    for name, mod in model.named_modules():
        src = _quantized_source(mod)
        if src is None:
            continue
        if name == "":
            raise ValueError("the root module itself is quantized; save a model that contains it")
        rec, ts = _layer_entry(name, mod, src, sdt)
        layers.append(rec)
        tensors.update(ts)
        qnames.append(name)
    prefixes = tuple(n + "." for n in qnames)
    seen: dict[tuple[int, int], str] = {}
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        t = t.detach().cpu()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            t = t.clone()  # safetensors refuses shared storage (tied weights are stored twice)
        seen[ident] = key
        tensors[key] = t.contiguous()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    from specquant import __version__

    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "specquant_version": __version__,
        "model": model_info, "quantized": bool(layers), "scale_dtype": _dtype_name(sdt),
    }
    header["layer_defaults"], header["layers"] = _compact_layers(layers)
    header["folded_bn"] = folded
    header["meta"] = _jsonable(meta or {})
    header["payload_sha256"] = payload_digest(header, tensors)
    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})
    return _write_atomic(Path(path), data)


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write through a temporary file in the same folder, fsync it, then ``os.replace``."""
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable too (not possible on every platform)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """Parse and check the safetensors framing; returns (header, tensors, header bytes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SQFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise SQFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) < 8:
        raise SQFormatError(f"{path}: not a specquant file (only {len(data)} bytes, no safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or n < 2:
        raise SQFormatError(f"{path}: not a specquant file (no valid safetensors header)")
    if 8 + n > len(data):
        raise SQFormatError(f"{path}: truncated file ({len(data)} bytes, its header alone needs {8 + n})")
    try:
        st_header = json.loads(data[8:8 + n].decode("utf-8"))
        if not isinstance(st_header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise SQFormatError(f"{path}: not a specquant file (the safetensors header is not valid JSON)"
                            ) from None
    meta = st_header.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        if b'"specquant' in data[8:8 + n] or b'\\"specquant' in data[8:8 + n]:
            raise SQFormatError(f"{path}: corrupted header (its specquant metadata cannot be found)")
        raise SQFormatError(f"{path}: not a specquant file (a safetensors file without a specquant header)")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in st_header.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise SQFormatError(f"{path}: corrupted safetensors header (bad tensor entries)") from None
    expected = 8 + n + max(ends, default=0)
    if len(data) < expected:
        raise SQFormatError(f"{path}: truncated file ({len(data)} bytes, the header describes {expected})")
    if len(data) > expected:
        raise SQFormatError(f"{path}: {len(data) - expected} unexpected trailing bytes after the tensors")
    try:
        header = json.loads(meta[METADATA_KEY])
        if not isinstance(header, dict):
            raise ValueError
    except (TypeError, ValueError):
        raise SQFormatError(f"{path}: corrupted specquant header (not a JSON object)") from None
    if header.get("format") != FORMAT_NAME:
        raise SQFormatError(f"{path}: not a specquant file (format {header.get('format')!r})")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise SQFormatError(
            f"{path}: unsupported specquant format version {version!r} (this specquant reads version "
            f"{FORMAT_VERSION})"
        )
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SQFormatError(f"{path}: corrupted tensor data ({first})") from None
    return header, tensors, n


def read_header(path) -> dict:
    """The JSON header of a specquant file (checked: framing, format, version, SHA-256).

    ``layers`` holds the full per-layer records (``layer_defaults`` merged in).
    """
    path = Path(path)
    header, tensors, _ = _read_file(path)
    _check_digest(path, header, tensors)
    return _expanded(path, header)


def _expanded(path: Path, header: dict) -> dict:
    try:
        layers = expand_layers(header)
    except SQFormatError as e:
        raise SQFormatError(f"{path}: {e}") from None
    return {**{k: v for k, v in header.items() if k != "layer_defaults"}, "layers": layers}


def _check_digest(path: Path, header: dict, tensors: dict) -> None:
    want = header.get("payload_sha256")
    if not isinstance(want, str):
        raise SQFormatError(f"{path}: the header has no payload_sha256")
    if payload_digest(header, tensors) != want:
        raise SQFormatError(f"{path}: checksum mismatch: the file was altered or corrupted (SHA-256 of "
                            f"the payload differs from the header's)")


def _need(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise SQFormatError(f"{path}: header and tensors disagree: {msg}")


def _check_layer(path: Path, rec: dict, tensors: dict) -> dict:
    """Validate one layer record against its tensors; returns the layer's constructor arguments."""
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise SQFormatError(f"{path}: corrupted header: bad layer record {str(rec)[:80]!r}")
    name = rec["name"]
    try:
        kind = rec["kind"]
        if kind not in WEIGHT_KINDS:
            raise SQFormatError(f"{path}: layer '{name}' has unknown weight kind {kind!r} "
                                f"(known: {', '.join(WEIGHT_KINDS)})")
        spec = GridSpec(int(rec["bits"]), rec["grid"])
        gran = Granularity.parse(rec["granularity"], axis=int(rec.get("axis", 0)))
        shape = tuple(int(s) for s in rec["shape"])
        dtype = _DTYPES[rec["dtype"]]
        sdt = _DTYPES[rec["scale_dtype"]]
        ltype = rec["type"]
        zp_kind = rec["zero_point"]
        has_bias = bool(rec["bias"])
    except SQFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise SQFormatError(f"{path}: corrupted header: layer '{name}': {e}") from None
    _need(ltype in _LAYER_TYPES, path, f"layer '{name}' has unknown type {ltype!r}")
    _need(rec.get("levels") == spec.levels, path, f"layer '{name}' has {rec.get('levels')} levels, its grid "
          f"{spec.kind} at {spec.bits} bits has {spec.levels}")
    _need(sdt in (torch.float32, torch.float16), path, f"layer '{name}' scale dtype {rec['scale_dtype']}")
    frame = None
    codes_shape = shape
    if kind == "frame":
        frame = rec.get("frame")
        _need(isinstance(frame, dict) and set(frame) == set(FRAME_KEYS), path,
              f"layer '{name}' lacks its frame parameters")
        codes_shape = tuple(int(s) for s in rec.get("codes_shape", ()))
        _need(len(codes_shape) == 2, path, f"layer '{name}' lacks its codes shape")
    numel = math.prod(codes_shape)
    codes = tensors.get(f"{name}.codes")
    _need(codes is not None, path, f"layer '{name}' has no codes tensor")
    packing = rec.get("packing") or "bits"
    _need(packing in PACKINGS, path, f"layer '{name}' has unknown code packing {packing!r}")
    row_bits = tensors.get(f"{name}.row_bits")
    if packing == "rows":
        _need(kind == "uniform" and gran.kind == "channel" and gran.axis == 0, path,
              f"layer '{name}': per-row widths need uniform weights with per-channel scales")
        _need(row_bits is not None and row_bits.dtype == torch.uint8 and tuple(row_bits.shape) == (shape[0],),
              path, f"'{name}.row_bits' should be uint8 ({shape[0]},)")
        _need(bool(((row_bits >= 1) & (row_bits <= 8)).all()) and int(row_bits.max()) == spec.bits, path,
              f"'{name}.row_bits' must hold widths in 1..8 whose largest is the layer's {spec.bits} bits")
    else:
        _need(row_bits is None, path, f"'{name}.row_bits' present but the layer's packing is {packing!r}")
        _need(packing != "trits" or packing_for(spec.levels, spec.bits) == "trits", path,
              f"layer '{name}': 'trits' packing on a {spec.levels}-level grid")
    need = layout_nbytes(packing, spec, codes_shape, row_bits)
    _need(codes.dtype == torch.uint8 and codes.dim() == 1 and codes.numel() == need, path,
          f"'{name}.codes' is {_dtype_name(codes.dtype)} {tuple(codes.shape)}, expected uint8 ({need},) for "
          f"{numel} codes of {spec.bits} bits ({packing} packing)")
    scale = tensors.get(f"{name}.scale")
    try:
        sshape = gran.scale_shape(codes_shape)
    except ValueError as e:
        raise SQFormatError(f"{path}: header and tensors disagree: layer '{name}': {e}") from None
    _need(scale is not None and scale.dtype == sdt and tuple(scale.shape) == sshape, path,
          f"'{name}.scale' should be {rec['scale_dtype']} {sshape}, got "
          f"{'nothing' if scale is None else f'{_dtype_name(scale.dtype)} {tuple(scale.shape)}'}")
    zp = tensors.get(f"{name}.zero_point")
    if zp_kind == "implicit":
        _need(zp is None, path, f"'{name}.zero_point' present but the header says the grid fixes it")
        _need(spec.symmetric, path, f"layer '{name}': an asymmetric grid needs stored zero points")
    else:
        _need(zp_kind in ("uint8", "float32"), path, f"layer '{name}' zero point kind {zp_kind!r}")
        _need(zp is not None and _dtype_name(zp.dtype) == zp_kind and tuple(zp.shape) == sshape, path,
              f"'{name}.zero_point' should be {zp_kind} {sshape}")
        zp = zp.float()
    bias = tensors.get(f"{name}.bias")
    if has_bias:
        _need(bias is not None and tuple(bias.shape) == (shape[0],) and bias.is_floating_point(), path,
              f"'{name}.bias' should be a float tensor of shape ({shape[0]},)")
    else:
        _need(bias is None, path, f"'{name}.bias' present but the header says the layer has no bias")
    return {
        "spec": spec, "granularity": gran, "codes": codes, "scale": scale, "zero_point": zp,
        "bias": bias if has_bias else None, "dtype": dtype, "algorithm": str(rec.get("algorithm", "")),
        "info": rec.get("info") or {}, "kind": kind, "frame": frame, "shape": shape, "type": ltype,
        "row_bits": row_bits, "packing": packing,
    }


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor, path: Path) -> None:
    """Put a float tensor of the file in its place in the architecture."""
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise SQFormatError(f"{path}: header and tensors disagree: tensor '{key}' names no module of the "
                            f"architecture") from None
    if attr in mod._parameters:
        old = mod._parameters[attr]
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise SQFormatError(f"{path}: header and tensors disagree: '{key}' has shape "
                                f"{tuple(t.shape)}, the architecture expects {tuple(old.shape)}")
        req = old.requires_grad if old is not None else t.is_floating_point()
        mod._parameters[attr] = nn.Parameter(t, requires_grad=req and t.is_floating_point())
    elif attr in mod._buffers:
        old = mod._buffers[attr]
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise SQFormatError(f"{path}: header and tensors disagree: '{key}' has shape "
                                f"{tuple(t.shape)}, the architecture expects {tuple(old.shape)}")
        mod._buffers[attr] = t
    else:
        raise SQFormatError(f"{path}: header and tensors disagree: tensor '{key}' has no place in the "
                            f"architecture")


def load(path, data_dir=None, *, int8_dynamic: bool | str = False, cache_dequantized: bool = False
         ) -> nn.Module:
    """Rebuild the model saved in ``path`` (eval mode), quantized layers as packed layers.

    Args:
        path: a file written by :func:`save`.
        data_dir: passed to the zoo when building the architecture (no zoo build needs it today).
        int8_dynamic: run 8-bit layers on the int8 dynamic path: True/"linear" the Linear layers,
            "all" the Conv2d layers too (as ``specquant.nn.convert``).
        cache_dequantized: let the packed layers keep their dequantized weight after the first call.
    Raises ``SQFormatError`` (a ``ValueError``) with one line naming the problem.
    """
    path = Path(path)
    if int8_dynamic not in (False, True, "linear", "all"):
        raise ValueError(f"int8_dynamic must be False, True, 'linear' or 'all', got {int8_dynamic!r}")
    header, tensors, _ = _read_file(path)
    _check_digest(path, header, tensors)
    header = _expanded(path, header)
    layers = header.get("layers")
    folded = header.get("folded_bn")
    model_info = header.get("model")
    if not isinstance(layers, list) or not isinstance(folded, list) or not isinstance(model_info, dict):
        raise SQFormatError(f"{path}: corrupted header: 'layers', 'folded_bn' or 'model' missing")
    args = [_check_layer(path, rec, tensors) for rec in layers]
    names = [rec["name"] for rec in layers]
    if len(set(names)) != len(names):
        raise SQFormatError(f"{path}: corrupted header: a layer is listed twice")

    model = build_skeleton(model_info, data_dir)
    for bn in folded:
        try:
            mod = model.get_submodule(bn)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise SQFormatError(f"{path}: header and architecture disagree: folded BatchNorm '{bn}' is not a "
                                f"BatchNorm of the architecture")
        _set_module(model, bn, nn.Identity())
    used: set[str] = set()
    for name, a in zip(names, args):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is None or type(mod).__name__ != a["type"]:
            raise SQFormatError(f"{path}: header and architecture disagree: layer '{name}' is "
                                f"{type(mod).__name__ if mod is not None else 'missing'}, the header says "
                                f"{a['type']}")
        if tuple(mod.weight.shape) != a["shape"]:
            raise SQFormatError(f"{path}: header and architecture disagree: layer '{name}' weight is "
                                f"{tuple(mod.weight.shape)}, the header says {a['shape']}")
        cls = _LAYER_TYPES[a["type"]]
        kw = {k: a[k] for k in ("spec", "granularity", "codes", "scale", "zero_point", "bias", "dtype",
                                "algorithm", "info", "kind", "frame", "row_bits", "packing")}
        try:
            if cls is QuantLinear:
                layer = QuantLinear(mod.in_features, mod.out_features, cache_dequantized=cache_dequantized,
                                    **kw)
            else:
                layer = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.padding_mode, cache_dequantized=cache_dequantized,
                            **kw)
        except ValueError as e:
            raise SQFormatError(f"{path}: header and tensors disagree: layer '{name}': {e}") from None
        if wants_int8(layer, int8_dynamic):
            layer.set_mode("int8_dynamic")
        _set_module(model, name, layer)
        for key in layer.state_dict():
            used.add(f"{name}.{key}")
    for key, t in tensors.items():
        if key in used:
            continue
        _set_tensor(model, key, t, path)
        used.add(key)
    missing = sorted(set(model.state_dict()) - used)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SQFormatError(f"{path}: header and tensors disagree: the file lacks "
                            f"{', '.join(repr(m) for m in missing[:3])}{more}")
    model.eval()
    model._specquant_model_id = model_info.get("zoo_id")
    model._specquant_arch = model_info.get("arch")
    model.specquant_header = {k: v for k, v in header.items() if k != "layers"}
    return model


def storage_breakdown(path) -> dict:
    """Bytes of a saved file by role, and bits per weight including every overhead.

    ``ideal_bytes`` = packed codes + scales + zero points + float tensors (what the payload must
    hold); ``overhead_bytes`` = file − ideal (the safetensors and JSON headers, alignment).
    ``bits_per_weight`` = (file − float tensors)·8 / quantized weights: codes, scales, zero
    points and all headers, per weight of the quantized layers.
    """
    path = Path(path)
    header, tensors, n_header = _read_file(path)
    header = _expanded(path, header)
    layer_keys, codes_b, scale_b, zp_b, n_weights = set(), 0, 0, 0, 0
    for rec in header.get("layers", []):
        name = rec["name"]
        n_weights += math.prod(rec["shape"])
        for suffix in ("codes", "scale", "zero_point", "row_bits"):
            t = tensors.get(f"{name}.{suffix}")
            if t is None:
                continue
            layer_keys.add(f"{name}.{suffix}")
            nb = t.numel() * t.element_size()
            if suffix == "codes":
                codes_b += nb
            elif suffix == "scale":
                scale_b += nb
            else:  # zero points, and the per-row widths of mixed rows: the grid's other parameters
                zp_b += nb
    float_b = sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in layer_keys)
    file_b = path.stat().st_size
    ideal = codes_b + scale_b + zp_b + float_b
    return {
        "file_bytes": file_b, "ideal_bytes": ideal, "overhead_bytes": file_b - ideal,
        "codes_bytes": codes_b, "scale_bytes": scale_b, "zero_point_bytes": zp_b, "float_bytes": float_b,
        "header_bytes": 8 + n_header,
        "quantized_weights": n_weights,
        "bits_per_weight": (file_b - float_b) * 8 / n_weights if n_weights else None,
    }
