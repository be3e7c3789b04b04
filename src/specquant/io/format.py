"""The packed model format: one safetensors file, a JSON header in its metadata, no pickle.

Tensors
    ``<layer>.codes``       uint8, 1-D: the layer's codes packed by its layout
                            (``specquant.core.layouts``; bit packed: ceil(numel·bits/8) bytes, at 8
                            bits the codes themselves)
    ``<layer>.scale``       one scale per block, ``granularity.scale_shape`` (groups: one per
                            ceil(N0/G) groups of a row, the last one shorter when G does not
                            divide N0); float32 or float16, stated per layer: the dtype the layer
                            was quantized with (``QuantConfig.scale_dtype``) unless ``save`` was
                            given ``scale_dtype``
    ``<layer>.zero_point``  only when the grid does not fix it (asymmetric grids): uint8 when every
                            zero point is an integer in 0..255, else float32
    ``<layer>.bias``        the layer's float bias, when it has one
    ``<layer>.<name>``      the layout's own tensors (``Layout.tensors()``): ``row_bits``, uint8
                            (out,), each output row's width, when rows mix widths (``RowsLayout``)
    every other entry of the model's ``state_dict()`` (biases, BatchNorm parameters and
    statistics, parameters of layers left in float), under its own name and dtype.

Header: the safetensors metadata maps ``"specquant"`` to a JSON object::

    {"format": "specquant", "version": 1, "specquant_version": "0.1.0",
     "model": {"zoo_id": "resnet20-cifar10" | null, "arch": "package.module:function" | null},
     "quantized": true, "scale_dtype": "float32",  (the layers' scale dtype, "mixed" when they differ;
                                                    informational, each layer states its own)
     "layers": [{"name", "type" (Linear/Conv1d/Conv2d), "kind" ("uniform" | "frame"), "bits",
                 "grid", "levels", "granularity" ("tensor"/"channel"/"group:G"), "axis",
                 "shape", "codes_shape", "dtype", "scale_dtype", "zero_point"
                 ("implicit"/"uint8"/"float32"), "bias", "algorithm", "info", "frame" (frame kind:
                 kind, dim, size, seed, order, along), "packing" ("bits": codes bit-packed at
                 "bits" each; "trits": a 3-level grid's codes five per byte; "rows": per-row widths
                 in ``<layer>.row_bits``; absent means "bits", as files written before it),
                 "act" (only for a layer that quantizes its input, ``QuantConfig.act_bits``:
                 {"bits": 1..8, "scale": a finite float32 value > 0, "zero_point": an integer in
                 0..2^bits − 1, "calibrator": the core calibrator that chose the range}; absent:
                 float input, as files written before it)}, ...],
                                     (fields are written in this order: the bytes of a file do
                                     not depend on the code that wrote them)
     "layer_defaults": {...},        fields shared by most layers, written once: a stored record
                                     is {**layer_defaults, **record} with null meaning "absent"
     "folded_bn": ["bn1", ...],      BatchNorms folded into convs: load replaces them by Identity
     "meta": {...},                  free JSON given to save(meta=...)
     "payload_sha256": "<hex>"}

Records and code: the file keeps the names of format version 1; the code speaks of layouts.

==================================  ==========================================================
record                              code
==================================  ==========================================================
"kind" (of a layer)                 the weight kind, ``Layout.weight_kind``: "uniform" codes
                                    are the weight's entries, "frame" codes frame coefficients
"packing"                           the byte layout's record name, ``Layout.packing``; with
                                    "kind" it picks the ``Layout`` class
                                    (``Layout.from_record``): ("uniform", "bits") BitsLayout,
                                    ("uniform", "trits") TritsLayout, ("uniform", "rows")
                                    RowsLayout, ("frame", "bits") FrameLayout
"frame", "codes_shape"              ``FrameLayout`` fields (``frame_params()``, ``shape``)
"frame"["kind"]                     the frame kind, ``FrameLayout.frame_kind`` ("harmonic" …)
``<layer>.row_bits``                ``RowsLayout.row_bits`` (``Layout.tensors()``)
"grid"                              the grid kind, ``GridSpec.kind`` ("narrow", "midrise", …)
"zero_point"                        how zero points are stored ("implicit": the grid fixes them)
==================================  ==========================================================

Every layout field and tensor is written by ``Layout.to_record()``/``Layout.tensors()`` and
read back by ``Layout.from_record`` and ``Layout.validate``; their errors become one
``SQFormatError`` line.

``payload_sha256`` is the SHA-256 of the header without that field (canonical JSON: sorted keys,
compact separators) followed, for every tensor in name order, by ``name NUL dtype NUL shape NUL``
and the tensor's bytes.  ``load`` checks it, then checks that header and tensors agree (dtypes,
shapes, byte counts), so a truncated, altered or foreign file gives one ``SQFormatError`` line
(a ``ValueError``) and never a wrong model.

Ties: a tensor that the model holds under several names (tied weights, e.g. an embedding
shared with the output layer) is stored once; the header's ``"tied": {"b.weight": "a.weight"}``
maps each other name to the stored one, and ``load`` puts the very same tensor back under both.
A quantized layer whose weight is another quantized layer's is recorded as
``{"name": "b", "tied_to": "a", ...}`` with no codes of its own (its bias is its own).

Trust: loading never imports or calls anything that the file names unless the caller says so.
The architecture comes, in this order, from a builder the caller passes (``load(path,
build=fn)``), from the zoo id (specquant's own code, architecture only: fresh weights, no
training, no data), or from the header's entry point ``"module:function"`` — and that last one
only when the caller allows exactly that name (``allow_entry_point="pkg.mod:fn"``, or
``--allow-entry-point`` on the command line; off by default, like ``trust_remote_code``).
Without it, a file that names an entry point is refused with one line saying how to allow it.
No pickle is ever read; every header value is type- and range-checked and the tensors are
checked against it (scales finite and ≥ 0, zero points finite, float tensors finite) before
any module is built.  Only regular files are read, and the header is checked against the
file size before any tensor is read.  A file saved from a float model has no quantized layers
and loads as that float model.  See SECURITY.md.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from specquant._version import __version__
from specquant.core.actquant import ActQuantizer, TokenActQuantizer, act_quantizer_from_record
from specquant.core.grid import SCALE_DTYPES, Granularity, GridSpec
from specquant.core.layouts import Layout, layout_tensor_names
from specquant.core.qweight import integer_zero_points
from specquant.hf_compat import is_hf_conv1d, linearize_conv1d
from specquant.io.files import atomic_write_bytes
from specquant.io.files import loads as strict_loads
from specquant.nn.layers import (
    PackedWeight,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    _QuantLayer,
    _set_module,
    quant_layer_class,
    wants_int8,
)
from specquant.nn.ort_kernel import KERNELS

FORMAT_NAME = "specquant"
FORMAT_VERSION = 1
METADATA_KEY = "specquant"
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
    """A JSON-safe copy of an algorithm's ``info`` (tensors become lists or a description).

    Not ``io.files.jsonable``: the header keeps its version-1 conventions (a tensor of more than
    16 entries becomes ``"tensor(shape)"``, a non-finite float the string ``"nan"``/``"inf"``,
    anything else its ``str``), so that saved files stay byte-identical."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist()) if v.numel() <= 16 else f"tensor{tuple(v.shape)}"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def payload_digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the header without ``payload_sha256`` and of every tensor, in name order."""
    h = digest_start(header)
    for name in sorted(tensors):
        digest_tensor(h, name, tensors[name])
    return h.hexdigest()


def digest_start(header: dict):
    """The SHA-256 of :func:`payload_digest` with the header in it; feed it every tensor in name
    order with :func:`digest_tensor` (tensors may come one at a time, e.g. from files on disk)."""
    h = hashlib.sha256()
    h.update(_canonical({k: v for k, v in header.items() if k != "payload_sha256"}))
    return h


def digest_tensor(h, name: str, t: torch.Tensor) -> None:
    """Add tensor ``name`` to the running payload digest ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"\0{name}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


_ENTRY_POINT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
                          r"(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _check_entry_point_name(arch: str) -> str:
    """``arch`` if it reads ``package.module:function`` (dotted identifiers only), else an error."""
    if not isinstance(arch, str) or len(arch) > 256 or not _ENTRY_POINT.fullmatch(arch):
        raise SQFormatError(f"architecture entry point {str(arch)[:80]!r} is not of the form 'module:function'")
    return arch


def _resolve_entry_point(arch: str) -> Callable[[], nn.Module]:
    """Import the caller-trusted entry point ``arch`` (only ever called for a trusted name)."""
    mod_name, _, attr = _check_entry_point_name(arch).partition(":")
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
        # A builder without an importable name (a lambda, a local function, a functools.partial)
        # records no entry point: the file is then loaded with load(path, build=...).
        module, qualname = getattr(arch, "__module__", None), getattr(arch, "__qualname__", None)
        if not module or not qualname or "<" in qualname:
            return None
        return f"{module}:{qualname}"
    raise ValueError(f"arch must be 'module:function' or a function, got {type(arch).__name__}")


def _allowed_names(allow_entry_point) -> frozenset[str]:
    """The entry points the caller trusts, from None, one name or an iterable of names."""
    if allow_entry_point is None:
        return frozenset()
    names = [allow_entry_point] if isinstance(allow_entry_point, str) else list(allow_entry_point)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"allow_entry_point must be 'module:function' strings, got {type(n).__name__}")
    return frozenset(names)


def _call_builder(fn: Callable[[], nn.Module], what: str) -> nn.Module:
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 - any failure of the builder is one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SQFormatError(f"cannot build the architecture ({what}): {type(e).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise SQFormatError(f"the architecture builder ({what}) returned {type(model).__name__}, not a module")
    return model


def build_skeleton(model_info: dict, data_dir=None, *, build: Callable[[], nn.Module] | None = None,
                   allow_entry_point=None, where: str = "") -> nn.Module:
    """The float architecture (fresh weights, eval mode) for a header's ``model`` entry.

    ``build`` (the caller's builder) wins; else the zoo id; else the header's entry point, only
    when it is one of ``allow_entry_point`` (see the module docstring: the file never chooses
    code to run).  ``data_dir`` is accepted for zoo entries whose build might need it.
    """
    zoo_id, arch = model_info.get("zoo_id"), model_info.get("arch")
    if build is not None:
        if not callable(build):
            raise TypeError(f"build must be a function returning the architecture, got {type(build).__name__}")
        model = _call_builder(build, f"build={getattr(build, '__qualname__', build)!r}")
    elif zoo_id is not None:
        # Imported here: models.zoo writes its cache through specquant.io.files, whose package
        # __init__ imports this module, so a module-level import would be circular.
        from specquant.models.zoo import get_entry

        try:
            entry = get_entry(zoo_id)
        except ValueError as e:
            raise SQFormatError(f"{where}{e}") from None
        model = _call_builder(entry.build, f"zoo id {zoo_id!r}")
    elif arch is not None:
        if arch not in _allowed_names(allow_entry_point):
            raise SQFormatError(
                f"{where}the file names the architecture entry point {arch!r}; loading it would import and run "
                f"that code, so it is off by default. If you trust the file, pass build=<your function> or "
                f"allow_entry_point={arch!r} to specquant.load (command line: --allow-entry-point {arch})")
        model = _call_builder(_resolve_entry_point(arch), f"entry point {arch!r}")
    else:
        raise SQFormatError(f"{where}the header names neither a zoo id nor an architecture entry point; "
                            f"pass build=<a function returning the architecture> to specquant.load")
    linearize_conv1d(model)  # GPT-2's Conv1D layers as the nn.Linear the engine made of them
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


def _layer_entry(name: str, mod: nn.Module, src, scale_dtype: torch.dtype | None) -> tuple[dict, dict]:
    """Header record and tensors of one quantized layer (``scale_dtype`` None: the scales in the dtype
    the packed layer holds them, ``QuantizedWeight.scale_dtype``)."""
    if isinstance(src, _QuantLayer):
        layer = src
    else:
        try:
            layer = quant_layer_class(mod).from_quantized(mod, src)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e}") from None
    packed = layer.packed
    scale = packed.scale
    if scale_dtype is None:  # as the layer holds them: float16 when quantized (or loaded) with float16 scales
        scale_dtype = scale.dtype if scale.dtype in (torch.float16, torch.float32) else torch.float32
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
    tensors = {f"{name}.codes": packed.packed_bytes().contiguous(), f"{name}.scale": scale.contiguous()}
    if packed.zero_point is None:
        zp_kind = "implicit"
    else:
        zp = packed.zero_point
        if integer_zero_points(zp):
            zp_kind = "uint8"
            tensors[f"{name}.zero_point"] = zp.to(torch.uint8).contiguous()
        else:
            zp_kind = "float32"
            tensors[f"{name}.zero_point"] = zp.float().contiguous()
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias.detach().contiguous()
    for suffix, t in packed.layout.tensors().items():
        tensors[f"{name}.{suffix}"] = t.detach().cpu().contiguous()
    g = packed.granularity
    rec = {
        "name": name, "type": layer.layer_type, "bits": packed.bits,
        "grid": packed.spec.kind, "levels": packed.spec.levels, "granularity": g.label(),
        "shape": list(packed.weight_shape), "dtype": _dtype_name(packed.dtype),
        "scale_dtype": _dtype_name(scale.dtype), "zero_point": zp_kind,
        "bias": layer.bias is not None, "algorithm": packed.algorithm, "info": _jsonable(packed.info),
    }
    if g.kind == "channel":
        rec["axis"] = g.axis
    if layer.input_quant is not None:
        rec["act"] = layer.input_quant.to_record()
    own = packed.layout.to_record()
    clash = set(own) & (set(rec) | set(_OWN_FIELDS))
    if clash:
        raise ValueError(f"layer '{name}': its layout's record fields {sorted(clash)} are the layer's own")
    return _in_record_order({**rec, **own}), tensors


# The order of a layer record's fields as format version 1 writes them (the header JSON is
# written in insertion order, so this keeps files byte-identical); fields that a newer layout
# adds follow, in its own order.
_RECORD_ORDER = ("name", "type", "kind", "bits", "grid", "levels", "granularity", "shape", "dtype", "scale_dtype",
                 "zero_point", "bias", "algorithm", "info", "packing", "axis", "frame", "codes_shape")


def _in_record_order(rec: dict) -> dict:
    first = {k: rec[k] for k in _RECORD_ORDER if k in rec}
    return {**first, **{k: v for k, v in rec.items() if k not in first}}


def _weight_ids(mod: nn.Module, src) -> tuple[int, ...]:
    """Identities of a quantized layer's stored weight: two layers sharing one are tied."""
    if isinstance(src, _QuantLayer):
        return (id(src.packed),)
    return (id(src), id(mod.weight))


def _tied_entry(name: str, mod: nn.Module, src, first: str) -> tuple[dict, dict]:
    """Header record and tensors of a layer whose quantized weight is layer ``first``'s."""
    layer_type = src.layer_type if isinstance(src, _QuantLayer) else type(mod).__name__
    shape = src.weight_shape if isinstance(src, _QuantLayer) else tuple(mod.weight.shape)
    bias = mod.bias
    rec = {"name": name, "tied_to": first, "type": layer_type, "shape": list(shape), "bias": bias is not None}
    aq = src.input_quant if isinstance(src, _QuantLayer) else getattr(mod, "act_quant", None)
    if aq is not None:
        rec["act"] = aq.to_record()
    return rec, ({} if bias is None else {f"{name}.bias": bias.detach().contiguous()})


_OWN_FIELDS = ("name", "shape", "tied_to")  # never shared through layer_defaults


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
    defaults = header.get("layer_defaults", {})
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
         scale_dtype: str | None = None) -> Path:
    """Write ``model`` (quantized by ``specquant.quantize``, converted, loaded, or float) to ``path``.

    Args:
        model: the model; modules with ``.qweight`` or packed layers are written as packed codes.
        path: the file to write (atomically: temporary file in the same folder, fsync, rename).
        model_id: zoo id that rebuilds the architecture (``specquant.models.list_models()``).
        arch: else an entry point ``"module:function"`` (or the function) that builds it.
            Either defaults to what ``load`` recorded on a loaded model.
        meta: free JSON-able information kept in the header (e.g. the quantization report);
            defaults to the meta of the file a loaded model came from.
        scale_dtype: None (default): each layer's scales in the dtype it was quantized with
            (``QuantConfig.scale_dtype``: float32 unless asked otherwise) or loaded with — the file
            then loads bit-identical to the model; ``"fp32"``: float32 scales; ``"fp16"``: float16
            scales, half the scale bytes, rounded here when the model's are float32 (the loaded
            model then uses the rounded scales and differs slightly from this one; quantize with
            ``scale_dtype="float16"`` instead to have the codes chosen for the rounded scales).
    Returns the path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be None, 'fp32' or 'fp16', got {scale_dtype!r}")
    sdt = None if scale_dtype is None else SCALE_DTYPES[scale_dtype]
    model_id = model_id if model_id is not None else getattr(model, "_specquant_model_id", None)
    arch_given = arch
    arch = _arch_string(arch if arch is not None else getattr(model, "_specquant_arch", None))
    if model_id is None and arch is None and not callable(arch_given):
        raise ValueError("save needs model_id= (a zoo id) or arch= ('module:function') so that load can "
                         "rebuild the architecture")
    if meta is None:  # a loaded model keeps the meta of its file
        meta = (getattr(model, "specquant_header", None) or {}).get("meta")
    model_info = {"zoo_id": model_id, "arch": arch}
    # The caller names the architecture here, so building it is the caller's own code; a model
    # that load() built with the caller's build= keeps that builder for saving again.
    if callable(arch_given):
        own_build = arch_given
    elif arch == getattr(model, "_specquant_arch", None):
        own_build = getattr(model, "_specquant_build", None)
    else:
        own_build = None
    try:
        skeleton = build_skeleton(model_info, build=own_build, allow_entry_point=arch)
    except SQFormatError as e:
        raise ValueError(str(e)) from None
    folded = _folded_bns(model, skeleton)
    conv1d = next((n for n, m in model.named_modules() if is_hf_conv1d(m)), None)
    if conv1d is not None:
        raise ValueError(f"layer '{conv1d}' is a transformers Conv1D that was never quantized; quantize the model "
                         f"(which turns Conv1D into nn.Linear) or call specquant.hf_compat.linearize_conv1d(model) "
                         f"before saving")

    layers, tensors, qnames = quantized_entries(model, sdt)
    float_tensors, tied = float_entries(model, tuple(n + "." for n in qnames))
    tensors.update(float_tensors)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = make_header(model_info, layers, folded, tied, meta, sdt)
    header["payload_sha256"] = payload_digest(header, tensors)
    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})
    return atomic_write_bytes(Path(path), data)


def quantized_entries(model: nn.Module, sdt: torch.dtype | None, prefix: str = "",
                      owners: dict | None = None) -> tuple[list[dict], dict, list[str]]:
    """(header records, tensors, names) of the quantized layers of ``model`` in module order; names
    start with ``prefix`` (``model`` may be one block of a larger model).  ``owners`` (id of a
    quantized weight -> the layer that stores it) carries ties across calls."""
    layers, tensors, qnames = [], {}, []
    owners = {} if owners is None else owners  # id of a quantized weight's storage -> the layer that stores it
    for name, mod in model.named_modules(remove_duplicate=False):
        src = _quantized_source(mod)
        if src is None:
            continue
        if name == "" and not prefix:
            raise ValueError("the root module itself is quantized; save a model that contains it")
        name = prefix + name if name else prefix.rstrip(".")
        ids = _weight_ids(mod, src)
        first = next((owners[i] for i in ids if i in owners), None)
        if first is not None:  # the same quantized weight as an earlier layer: stored once
            rec, ts = _tied_entry(name, mod, src, first)
        else:
            rec, ts = _layer_entry(name, mod, src, sdt)
            owners.update({i: name for i in ids})
        layers.append(rec)
        tensors.update(ts)
        qnames.append(name)
    return layers, tensors, qnames


def float_entries(model: nn.Module, skip: tuple[str, ...], prefix: str = "",
                  keep=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, ties) of ``model``'s state dict outside the quantized layers (keys starting with one
    of ``skip``), keys prefixed with ``prefix``; ``keep(key)``, when given, selects the keys.  A
    tensor held under two names is stored once and the second name recorded as tied to the first."""
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        key = prefix + key
        if key.startswith(skip) or (keep is not None and not keep(key)):
            continue
        t = t.detach().cpu()
        if t.numel():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if ident in seen:  # the same tensor under a second name: stored once, the tie recorded
                tied[key] = seen[ident]
                continue
            if any(i[0] == ident[0] for i in seen):
                t = t.clone()  # a different view of shared storage: safetensors wants its own copy
            seen[ident] = key
        tensors[key] = t.contiguous()
    return tensors, tied


def make_header(model_info: dict, layers: list[dict], folded: list[str], tied: dict[str, str], meta: dict | None,
                sdt: torch.dtype | None) -> dict:
    """The specquant header of a file holding ``layers`` (without ``payload_sha256``)."""
    if sdt is None:  # the layers' own: one name when they agree (float32 for a float model), else "mixed"
        stored = {r["scale_dtype"] for r in layers if "scale_dtype" in r}
        header_sdt = stored.pop() if len(stored) == 1 else ("float32" if not stored else "mixed")
    else:
        header_sdt = _dtype_name(sdt)
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "specquant_version": __version__,
        "model": model_info, "quantized": bool(layers), "scale_dtype": header_sdt,
    }
    header["layer_defaults"], header["layers"] = _compact_layers(layers)
    header["folded_bn"] = folded
    if tied:
        header["tied"] = tied
    header["meta"] = _jsonable(meta or {})
    return header


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _open_regular(path: Path) -> tuple[object, int]:
    """Open ``path`` for reading only if it is a regular file; returns (file, size)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SQFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise SQFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, device or socket)"
        raise SQFormatError(f"{path}: is {what}; a specquant model is a regular file")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise SQFormatError(f"{path}: cannot read ({e.strerror or e})") from None
    size = os.fstat(f.fileno()).st_size
    return f, size


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1}  # safetensors dtypes this format uses, and their sizes in bytes


def _check_st_entries(path: Path, st_header: dict, n: int, size: int) -> None:
    """The safetensors tensor table: known dtypes, sane shapes, offsets that tile the payload."""
    spans = []
    for key, v in st_header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(v, dict) and _one_of(v.get("dtype"), _ST_DTYPES) and isinstance(v.get("shape"), list)
              and all(type(d) is int and 0 <= d < 2**40 for d in v["shape"]) and len(v["shape"]) <= 8
              and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in v["data_offsets"]))
        if not ok:
            raise SQFormatError(f"{path}: corrupted safetensors header (bad entry for tensor {str(key)[:60]!r})")
        lo, hi = v["data_offsets"]
        if hi - lo != math.prod(v["shape"]) * _ST_DTYPES[v["dtype"]]:
            raise SQFormatError(f"{path}: corrupted safetensors header (tensor {str(key)[:60]!r}: its byte range "
                                f"does not match its shape and dtype)")
        spans.append((lo, hi))
    spans.sort()
    end = 0
    for lo, hi in spans:
        if lo != end:
            raise SQFormatError(f"{path}: corrupted safetensors header (tensor byte ranges overlap or leave gaps)")
        end = hi
    expected = 8 + n + end
    if size < expected:
        raise SQFormatError(f"{path}: truncated file ({size} bytes, the header describes {expected})")
    if size > expected:
        raise SQFormatError(f"{path}: {size - expected} unexpected trailing bytes after the tensors")


def _read_file(path: Path, *, with_tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor], int]:
    """Parse and check the safetensors framing; returns (header, tensors, header bytes).

    Only a regular file is opened; the header is read and checked against the file size before
    any tensor byte is read, and tensors are read from a memory map, one at a time.
    """
    f, size = _open_regular(path)
    with f:
        if size < 8:
            raise SQFormatError(f"{path}: not a specquant file (only {size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or n < 2:
            raise SQFormatError(f"{path}: not a specquant file (no valid safetensors header)")
        if 8 + n > size:
            raise SQFormatError(f"{path}: truncated file ({size} bytes, its header alone needs {8 + n})")
        raw = f.read(n)
    if len(raw) != n:
        raise SQFormatError(f"{path}: truncated file (the file changed while it was read)")
    try:
        st_header = strict_loads(raw.decode("utf-8"))
        if not isinstance(st_header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise SQFormatError(f"{path}: not a specquant file (the safetensors header is not valid JSON)"
                            ) from None
    meta = st_header.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        if b'"specquant' in raw or b'\\"specquant' in raw:
            raise SQFormatError(f"{path}: corrupted header (its specquant metadata cannot be found)")
        raise SQFormatError(f"{path}: not a specquant file (a safetensors file without a specquant header)")
    _check_st_entries(path, st_header, n, size)
    try:
        header = strict_loads(meta[METADATA_KEY])
        if not isinstance(header, dict):
            raise ValueError
    except (TypeError, ValueError):
        raise SQFormatError(f"{path}: corrupted specquant header (not a JSON object)") from None
    if header.get("format") != FORMAT_NAME:
        raise SQFormatError(f"{path}: not a specquant file (format {str(header.get('format'))[:40]!r})")
    version = header.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise SQFormatError(
            f"{path}: unsupported specquant format version {version!r} (this specquant reads version "
            f"{FORMAT_VERSION})"
        )
    if not with_tensors:
        return header, {}, n
    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                tensors[key] = sf.get_tensor(key)
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


def _bad(path: Path, msg: str) -> SQFormatError:
    return SQFormatError(f"{path}: corrupted header: {msg}")


def _one_of(v, options) -> bool:
    """``v`` is one of the string ``options`` (safe for any JSON value, hashable or not)."""
    return isinstance(v, str) and v in options


def _is_int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _module_name(v) -> bool:
    """A dotted module path as ``named_modules`` writes it (no empty parts, bounded length)."""
    return isinstance(v, str) and 0 < len(v) <= 512 and all(part and part.isprintable() for part in v.split("."))


def _check_header(path: Path, header: dict) -> dict:
    """Type- and range-check the top level of an (expanded) header; returns the model entry."""
    model_info = header.get("model")
    if not isinstance(model_info, dict) or not set(model_info) <= {"zoo_id", "arch"}:
        raise _bad(path, "'model' must be an object with 'zoo_id' and 'arch'")
    zoo_id, arch = model_info.get("zoo_id"), model_info.get("arch")
    if zoo_id is not None and not (isinstance(zoo_id, str) and 0 < len(zoo_id) <= 128):
        raise _bad(path, f"zoo id {str(zoo_id)[:60]!r} is not a short string")
    if arch is not None:
        try:
            _check_entry_point_name(arch)
        except SQFormatError as e:
            raise _bad(path, str(e)) from None
    for key, json_type in (("layers", list), ("folded_bn", list), ("meta", dict), ("tied", dict)):
        if key in header and not isinstance(header[key], json_type):
            raise _bad(path, f"'{key}' must be a JSON {'array' if json_type is list else 'object'}")
    if not isinstance(header.get("layers"), list) or not isinstance(header.get("folded_bn"), list):
        raise _bad(path, "'layers' or 'folded_bn' missing")
    if not all(_module_name(b) for b in header["folded_bn"]):
        raise _bad(path, "'folded_bn' must list module names")
    if not all(_module_name(k) and _module_name(v) and k != v for k, v in (header.get("tied") or {}).items()):
        raise _bad(path, "'tied' must map tensor names to other tensor names")
    if "quantized" in header and not isinstance(header["quantized"], bool):
        raise _bad(path, "'quantized' must be true or false")
    if "scale_dtype" in header and not _one_of(header["scale_dtype"], ("float32", "float16", "mixed")):
        raise _bad(path, f"'scale_dtype' {str(header['scale_dtype'])[:20]!r} is not float32, float16 or mixed")
    return model_info


_SHAPE_DIMS = {"Linear": 2, "Conv1d": 3, "Conv2d": 4}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_layer(path: Path, rec: dict, tensors: dict) -> dict:
    """Validate one layer record against its tensors; returns the layer's constructor arguments."""
    if not isinstance(rec, dict) or not _module_name(rec.get("name")):
        raise _bad(path, f"bad layer record {str(rec)[:80]!r}")
    name = rec["name"]
    ltype = rec.get("type")
    if not _one_of(ltype, _LAYER_TYPES):
        raise SQFormatError(f"{path}: header and tensors disagree: layer '{name}' has unknown type "
                            f"{str(ltype)[:40]!r}")
    shape = rec.get("shape")
    if not (isinstance(shape, list) and len(shape) == _SHAPE_DIMS[ltype] and all(_is_int(s, 1, 2**31) for s in shape)
            and math.prod(shape) <= 2**40):
        raise _bad(path, f"layer '{name}': shape {str(shape)[:60]} is not {_SHAPE_DIMS[ltype]} positive integers")
    shape = tuple(shape)
    if not isinstance(rec.get("bias"), bool):
        raise _bad(path, f"layer '{name}': 'bias' must be true or false")
    if "tied_to" in rec:
        return _check_tied(path, rec, tensors, shape)
    if not _is_int(rec.get("bits"), 1, 8):
        raise _bad(path, f"layer '{name}': bits {str(rec.get('bits'))[:20]} is not an integer in 1..8")
    if not _one_of(rec.get("dtype"), _FLOAT_DTYPES):
        raise _bad(path, f"layer '{name}': weight dtype {str(rec.get('dtype'))[:20]!r} is not a float dtype")
    if not isinstance(rec.get("granularity"), str) or ("axis" in rec and not _is_int(rec["axis"], 0, len(shape) - 1)):
        raise _bad(path, f"layer '{name}': bad granularity or axis")
    if not isinstance(rec.get("algorithm", ""), str) or not isinstance(rec.get("info", {}), dict):
        raise _bad(path, f"layer '{name}': 'algorithm' must be a string and 'info' an object")
    try:
        spec = GridSpec(rec["bits"], rec.get("grid"))
        gran = Granularity.parse(rec["granularity"], axis=rec.get("axis", 0))
        dtype = _DTYPES[rec["dtype"]]
        if not _one_of(rec.get("scale_dtype"), _DTYPES):
            raise ValueError(f"scale dtype {str(rec.get('scale_dtype'))[:20]!r}")
        sdt = _DTYPES[rec["scale_dtype"]]
        zp_kind = rec["zero_point"]
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"layer '{name}': {str(e)[:120]}") from None
    _need(rec.get("levels") == spec.levels, path, f"layer '{name}' has {str(rec.get('levels'))[:20]} levels, its "
          f"grid {spec.kind} at {spec.bits} bits has {spec.levels}")
    _need(sdt in (torch.float32, torch.float16), path, f"layer '{name}' scale dtype {rec['scale_dtype']}")
    codes = tensors.get(f"{name}.codes")
    _need(codes is not None, path, f"layer '{name}' has no codes tensor")
    own = {s: t for s in layout_tensor_names() if (t := tensors.get(f"{name}.{s}")) is not None}
    try:
        layout = Layout.from_record(rec, own, spec=spec, weight_shape=shape, layer=name)
        layout.validate(codes, spec=spec, granularity=gran, weight_shape=shape, layer=name)
    except (ValueError, TypeError, KeyError) as e:  # a layout's checks: whatever the record holds, one line
        text = str(e).strip()
        raise SQFormatError(f"{path}: header and tensors disagree: "
                            f"{text.splitlines()[0] if text else type(e).__name__}") from None
    for suffix in own:
        _need(suffix in layout.tensor_names, path, f"'{name}.{suffix}' present but the layer's layout is "
              f"{layout.name!r}")
    codes_shape = layout.shape
    scale = tensors.get(f"{name}.scale")
    try:
        sshape = gran.scale_shape(codes_shape)
    except ValueError as e:
        raise SQFormatError(f"{path}: header and tensors disagree: layer '{name}': {e}") from None
    _need(scale is not None and scale.dtype == sdt and tuple(scale.shape) == sshape, path,
          f"'{name}.scale' should be {rec['scale_dtype']} {sshape}, got "
          f"{'nothing' if scale is None else f'{_dtype_name(scale.dtype)} {tuple(scale.shape)}'}")
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        raise SQFormatError(f"{path}: layer '{name}' has invalid scales (NaN, infinite or negative): refused")
    zp = tensors.get(f"{name}.zero_point")
    if zp_kind == "implicit":
        _need(zp is None, path, f"'{name}.zero_point' present but the header says the grid fixes it")
        _need(spec.symmetric, path, f"layer '{name}': an asymmetric grid needs stored zero points")
    else:
        _need(_one_of(zp_kind, ("uint8", "float32")), path, f"layer '{name}' zero point kind {str(zp_kind)[:20]!r}")
        _need(zp is not None and _dtype_name(zp.dtype) == zp_kind and tuple(zp.shape) == sshape, path,
              f"'{name}.zero_point' should be {zp_kind} {sshape}")
        zp = zp.float()
        if not bool(torch.isfinite(zp).all()):
            raise SQFormatError(f"{path}: layer '{name}' has non-finite zero points: refused")
    bias = tensors.get(f"{name}.bias")
    _check_bias(path, name, rec["bias"], bias, shape)
    stored = [f"{name}.{s}" for s in ("codes", "scale", "zero_point", "bias", *layout.tensor_names)]
    return {
        "act": _check_act(path, name, rec),
        "layout": layout, "spec": spec, "granularity": gran, "codes": codes, "scale": scale, "zero_point": zp,
        "bias": bias if rec["bias"] else None, "dtype": dtype, "algorithm": rec.get("algorithm", ""),
        "info": rec.get("info") or {}, "shape": shape, "type": ltype,
        "tensors": [k for k in stored if k in tensors],
    }


def _check_bias(path: Path, name: str, has_bias: bool, bias: torch.Tensor | None, shape: tuple) -> None:
    if has_bias:
        _need(bias is not None and tuple(bias.shape) == (shape[0],) and bias.is_floating_point(), path,
              f"'{name}.bias' should be a float tensor of shape ({shape[0]},)")
        if not bool(torch.isfinite(bias).all()):
            raise SQFormatError(f"{path}: '{name}.bias' holds NaN or infinite values: refused")
    else:
        _need(bias is None, path, f"'{name}.bias' present but the header says the layer has no bias")


def _check_act(path: Path, name: str, rec: dict) -> ActQuantizer | TokenActQuantizer | None:
    """The layer's input quantizer from its record's "act" (absent: None), every value checked."""
    if "act" not in rec:
        return None
    try:
        return act_quantizer_from_record(rec["act"])
    except ValueError as e:
        raise _bad(path, f"layer '{name}': {str(e)[:160]}") from None


def _check_tied(path: Path, rec: dict, tensors: dict, shape: tuple) -> dict:
    """A layer whose quantized weight is an earlier layer's: only its own bias is stored."""
    name, first = rec["name"], rec["tied_to"]
    if not _module_name(first) or first == name:
        raise _bad(path, f"layer '{name}': 'tied_to' must name another layer")
    for suffix in ("codes", "scale", "zero_point", *layout_tensor_names()):
        _need(f"{name}.{suffix}" not in tensors, path, f"'{name}.{suffix}' present but layer '{name}' is tied to "
              f"'{first}'")
    bias = tensors.get(f"{name}.bias")
    _check_bias(path, name, rec["bias"], bias, shape)
    return {"tied_to": first, "shape": shape, "type": rec["type"], "bias": bias if rec["bias"] else None,
            "act": _check_act(path, name, rec),
            "tensors": [f"{name}.bias"] if rec["bias"] else []}


def _place(model: nn.Module, key: str, path: Path) -> tuple[nn.Module, str, torch.Tensor | None, bool]:
    """(module, attribute, the architecture's tensor there, is a parameter) for a state-dict key."""
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise SQFormatError(f"{path}: header and tensors disagree: tensor '{key}' names no module of the "
                            f"architecture") from None
    if attr in mod._parameters:
        return mod, attr, mod._parameters[attr], True
    if attr in mod._buffers:
        return mod, attr, mod._buffers[attr], False
    raise SQFormatError(f"{path}: header and tensors disagree: tensor '{key}' has no place in the architecture")


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor, path: Path) -> None:
    """Put a float tensor of the file in its place in the architecture."""
    mod, attr, old, is_param = _place(model, key, path)
    if old is not None and (tuple(old.shape) != tuple(t.shape) or old.dtype != t.dtype):
        raise SQFormatError(f"{path}: header and tensors disagree: '{key}' is {_dtype_name(t.dtype)} "
                            f"{tuple(t.shape)}, the architecture expects {_dtype_name(old.dtype)} {tuple(old.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise SQFormatError(f"{path}: tensor '{key}' holds NaN or infinite values: refused")
    if is_param:
        req = old.requires_grad if old is not None else t.is_floating_point()
        mod._parameters[attr] = nn.Parameter(t, requires_grad=req and t.is_floating_point())
    else:
        mod._buffers[attr] = t


def _tie_tensor(model: nn.Module, key: str, src: str, path: Path) -> None:
    """Make ``key`` the very tensor already placed at ``src`` (a tie recorded by save)."""
    smod, sattr, stensor, s_param = _place(model, src, path)
    mod, attr, old, is_param = _place(model, key, path)
    if stensor is None or is_param != s_param or (old is not None and (tuple(old.shape) != tuple(stensor.shape)
                                                                       or old.dtype != stensor.dtype)):
        raise SQFormatError(f"{path}: header and architecture disagree: '{key}' cannot be tied to '{src}'")
    (mod._parameters if is_param else mod._buffers)[attr] = stensor


def _new_layer(ltype: str, mod: nn.Module, packed: PackedWeight, bias, cache_dequantized: bool,
               kernel: str = "auto") -> _QuantLayer:
    """The packed layer of type ``ltype`` for the float module ``mod``, over ``packed``."""
    cls = _LAYER_TYPES[ltype]
    if cls is QuantLinear:
        return QuantLinear(mod.in_features, mod.out_features, packed=packed, bias=bias,
                           cache_dequantized=cache_dequantized, kernel=kernel)
    return cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
               mod.groups, mod.padding_mode, packed=packed, bias=bias, cache_dequantized=cache_dequantized)


def _build_layer(a: dict, mod: nn.Module, cache_dequantized: bool, kernel: str = "auto") -> _QuantLayer:
    """The packed layer for the float module ``mod`` from checked constructor arguments ``a``."""
    packed = PackedWeight(a["layout"], a["codes"], a["scale"], a["zero_point"], spec=a["spec"],
                          granularity=a["granularity"], weight_shape=a["shape"], dtype=a["dtype"],
                          algorithm=a["algorithm"], info=a["info"])
    layer = _new_layer(a["type"], mod, packed, a["bias"], cache_dequantized, kernel)
    layer.set_input_quant(a["act"])
    return layer


def _tied_layer(first: _QuantLayer, a: dict, mod: nn.Module, cache_dequantized: bool,
                kernel: str = "auto") -> _QuantLayer:
    """A packed layer sharing ``first``'s packed weight (one module), with its own bias."""
    layer = _new_layer(a["type"], mod, first.packed, a["bias"], cache_dequantized, kernel)
    layer.set_input_quant(a["act"])
    return layer


def load(path, data_dir=None, *, build: Callable[[], nn.Module] | None = None, allow_entry_point=None,
         int8_dynamic: bool | str = False, cache_dequantized: bool = False, kernel: str = "auto") -> nn.Module:
    """Rebuild the model saved in ``path`` (eval mode), quantized layers as packed layers.

    Args:
        path: a file written by :func:`save`.
        data_dir: passed to the zoo when building the architecture.
        build: a function of yours that returns the float architecture (fresh weights are
            fine); used instead of whatever the file names.
        allow_entry_point: ``"module:function"`` (or a list of them) that you trust: a file
            whose header names one of these may have it imported and called to build the
            architecture.  Without it such a file is refused (the file never picks code to run).
        int8_dynamic: run 8-bit layers on the int8 dynamic path: True/"linear" the Linear layers,
            "all" the Conv2d layers too (as ``specquant.nn.convert``).
        cache_dequantized: let the packed layers keep their dequantized weight after the first call.
        kernel: the Linear layers' weight-only kernel (``QuantLinear``): "auto" (onnxruntime's
            MatMulNBits where it runs: outputs equal the PyTorch path's up to float rounding),
            "torch" (the PyTorch path: bit-identical to the fake-quant model) or "onnxruntime".
    Raises ``SQFormatError`` (a ``ValueError``) with one line naming the problem.
    """
    path = Path(path)
    if int8_dynamic not in (False, True, "linear", "all"):
        raise ValueError(f"int8_dynamic must be False, True, 'linear' or 'all', got {int8_dynamic!r}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    _allowed_names(allow_entry_point)  # a bad argument fails before the file is read
    header, tensors, _ = _read_file(path)
    _check_digest(path, header, tensors)
    header = _expanded(path, header)
    model_info = _check_header(path, header)
    layers, folded = header["layers"], header["folded_bn"]
    args = [_check_layer(path, rec, tensors) for rec in layers]
    names = [rec["name"] for rec in layers]
    if len(set(names)) != len(names):
        raise _bad(path, "a layer is listed twice")
    position = {n: i for i, n in enumerate(names)}
    for n, a in zip(names, args):
        first = a.get("tied_to")
        if first is not None and (position.get(first, len(names)) > position[n] or "tied_to" in args[position[first]]):
            raise _bad(path, f"layer '{n}' is tied to '{first}', which is not an earlier untied layer")
    tied = header.get("tied") or {}
    for key, src in tied.items():
        _need(key not in tensors and src in tensors, path, f"tie '{key}' -> '{src}' does not match the tensors")

    model = build_skeleton(model_info, data_dir, build=build, allow_entry_point=allow_entry_point,
                           where=f"{path}: ")
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
    built: dict[str, _QuantLayer] = {}
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
        try:
            if "tied_to" in a:
                first = built[a["tied_to"]]
                if first.weight_shape != a["shape"] or first.layer_type != a["type"]:
                    raise ValueError(f"it is tied to '{a['tied_to']}', whose weight is a {first.layer_type} "
                                     f"{first.weight_shape}")
                layer = _tied_layer(first, a, mod, cache_dequantized, kernel)
            else:
                layer = _build_layer(a, mod, cache_dequantized, kernel)
        except ValueError as e:
            raise SQFormatError(f"{path}: header and tensors disagree: layer '{name}': {e}") from None
        if wants_int8(layer, int8_dynamic):
            layer.set_mode("int8_dynamic")
        _set_module(model, name, layer)
        built[name] = layer
        used.update(a["tensors"])
    own = tuple(f"{n}." for n in built)  # a packed layer's state is what it was built from, nothing else
    for key, t in tensors.items():
        if key in used:
            continue
        if key.startswith(own):  # e.g. '<layer>.packed.scale' or a cache buffer: never placed unchecked
            raise SQFormatError(f"{path}: header and tensors disagree: tensor '{key}' has no place in the "
                                f"architecture")
        _set_tensor(model, key, t, path)
        used.add(key)
    for key, src in tied.items():
        _tie_tensor(model, key, src, path)
        used.add(key)
    missing = sorted(k for k in model.state_dict() if k not in used and not k.startswith(own))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SQFormatError(f"{path}: header and tensors disagree: the file lacks "
                            f"{', '.join(repr(m) for m in missing[:3])}{more}")
    model.eval()
    model._specquant_model_id = model_info.get("zoo_id")
    model._specquant_arch = model_info.get("arch")
    model._specquant_build = build
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
    _check_header(path, header)
    layer_keys, codes_b, scale_b, zp_b, n_weights = set(), 0, 0, 0, 0
    for rec in header["layers"]:
        _check_layer(path, rec, tensors)
        name = rec["name"]
        if "tied_to" in rec:  # stores no weight of its own
            continue
        n_weights += math.prod(rec["shape"])
        for suffix in ("codes", "scale", "zero_point", *layout_tensor_names()):
            t = tensors.get(f"{name}.{suffix}")
            if t is None:
                continue
            layer_keys.add(f"{name}.{suffix}")
            nb = t.numel() * t.element_size()
            if suffix == "codes":
                codes_b += nb
            elif suffix == "scale":
                scale_b += nb
            else:  # zero points, and the layout's own tensors (per-row widths, ...): the grid's other parameters
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
