"""ONNX export: the model's graph with its quantized Linear layers as ``com.microsoft.MatMulNBits``.

``export_onnx(model, path, example)`` writes one ``.onnx`` file that runs in ``onnxruntime`` from
PyPI (CPU) and returns an ``OnnxExport`` report.  ``model`` is a fake-quant model (what
``sq.quantize`` leaves: layers with ``.qweight`` whose weight is the dequantized one) or a packed
one (``sq.load``, ``nn.convert``: ``QuantLinear`` / ``QuantConv*d`` layers, first turned back into
float layers with their dequantized weights, on a copy).

How it is built:

1. The graph: ``torch.onnx.export`` with the TorchScript tracer (``dynamo=False``, opset 17,
   constant folding on).  torch 2.13's default exporter (``dynamo=True``) needs ``onnxscript``,
   which specquant does not depend on; the tracer exports Hugging Face ``LlamaForCausalLM`` when
   the KV cache is off and an all-ones attention mask is passed (without a mask, transformers'
   packed-sequence check calls ``torch.diff``, which opset 17 lacks).  Inputs and outputs:
   classifiers ``input`` → ``output`` with a dynamic batch axis; language models (an integer
   ``example``) ``input_ids`` (batch, sequence) → ``logits`` (batch, sequence, vocab), both axes
   dynamic, no KV cache (each call runs the whole sequence).
2. Each quantized ``nn.Linear``: the MatMul (or Gemm, or MatMul of a Transpose) whose weight
   initializer holds exactly the layer's dequantized weight (or its transpose) becomes one
   ``MatMulNBits`` node whose tensors are the layer's codes and scales
   (``core.nbits.nbits_weight``: exact, never re-rounded; a Gemm's bias becomes an ``Add``); the
   float initializer is dropped unless another node still reads it (a tied embedding's Gather).
   ``accuracy_level`` is 0: onnxruntime multiplies in float32 without quantizing activations, so
   the outputs equal the fake-quant model's up to float rounding of the sums.
3. Quantized convolutions stay float ``Conv`` nodes whose weights are the dequantized codes
   (MatMulNBits has no convolution); every such layer is listed in the report with that note.
   Layers that were never quantized (embeddings, norms, float layers) stay as exported.

Refusals (one ``ValueError`` line naming the layer and the reason, nothing written): a quantized
Linear layer without an exact MatMulNBits form (3-, 5-, 6-, 7- or 1-bit codes, a group size that
is not a multiple of 16, rows of mixed widths, frame coefficients, non-integer zero points at 8
bits; see ``core.nbits``), a layer whose weight is no longer its dequantized codes, a layer whose
weight the exporter did not emit as a MatMul/Gemm initializer.

The file is written atomically (``io.files.atomic_write_bytes``); with ``verify`` (default) and
onnxruntime installed, the file is run on ``example`` and the largest absolute difference from the
fake-quant model's output goes into the report (``max_abs_diff``).
"""
from __future__ import annotations

import copy
import hashlib
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specquant.core.nbits import NBitsWeight, nbits_weight
from specquant.core.qweight import QuantizedWeight
from specquant.io.files import atomic_write_bytes
from specquant.nn.layers import QuantConv2d, QuantLinear, _QuantLayer

OPSET = 17  # ai.onnx opset of the exported graph (com.microsoft opset 1 for MatMulNBits)
EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"


@dataclass(frozen=True)
class OnnxLayer:
    """How one quantized layer went into the file."""

    name: str  # module name
    op: str  # "MatMulNBits", or "Conv (float)" for a quantized convolution kept in float
    bits: int  # code width of its quantization
    shape: tuple[int, ...]  # weight shape
    nbytes: int  # bytes its weight takes in the file: MatMulNBits' tensors, or the float32 weight
    block_size: int | None = None  # MatMulNBits block size
    zero_points: str | None = None  # "default" (2^(bits-1)), "uint8" or "float"
    blocks_per_group: int | None = None  # blocks repeating one of specquant's scales (1: its own groups)
    note: str = ""  # what the reader should know (float convolution, shared tensors, ...)


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote."""

    file: Path  # the .onnx file
    bytes: int  # its size
    format: str  # "onnx"
    type: str  # "lm" or "classifier"
    opset: int  # ai.onnx opset
    exporter: str  # how the graph was traced
    inputs: tuple[str, ...]  # graph input names
    outputs: tuple[str, ...]  # graph output names
    layers: tuple[OnnxLayer, ...]  # every quantized layer, in module order
    quantized_bytes: int  # bytes of the MatMulNBits tensors (codes, scales, zero points)
    float_bytes: int  # bytes of every other initializer (float weights, biases, norms, embeddings)
    max_abs_diff: float | None  # onnxruntime vs the fake-quant model on the example (None: not run)
    notes: tuple[str, ...]  # one line each: layers kept in float, what was not checked, ...

    @property
    def tensor_bytes(self) -> int:
        """Bytes the format dictates for the tensors (the file adds the graph and protobuf framing)."""
        return self.quantized_bytes + self.float_bytes

    def to_dict(self) -> dict:
        """A JSON-able dict of the report."""
        d = asdict(self)
        d["file"] = str(self.file)
        d["tensor_bytes"] = self.tensor_bytes
        return d


# ---- the model to trace --------------------------------------------------------------------------


def _float_module(layer: _QuantLayer) -> nn.Module:
    """The float layer a packed layer stands for, with its dequantized weight and ``.qweight``."""
    w = layer.packed.dequantize().float()
    bias = layer.bias is not None
    if isinstance(layer, QuantLinear):
        mod = nn.Linear(layer.in_features, layer.out_features, bias=bias)
    else:
        cls = nn.Conv2d if isinstance(layer, QuantConv2d) else nn.Conv1d
        mod = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, bias=bias, padding_mode=layer.padding_mode)
    with torch.no_grad():
        mod.weight.copy_(w)
        if bias:
            mod.bias.copy_(layer.bias.float())
    mod.qweight = layer.to_quantized_weight()
    return mod.train(layer.training)


def _fake_quant(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no packed layers, else a copy with each replaced by its float layer."""
    if not any(isinstance(m, _QuantLayer) for m in model.modules()):
        return model
    if isinstance(model, _QuantLayer):
        return _float_module(model)
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, _QuantLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, child, _float_module(mod))
    return twin


def _first_tensor(out) -> torch.Tensor:
    """The model's main output: a tensor, ``.logits``, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"cannot export a model whose output is {type(out).__name__} (need a tensor, .logits or a "
                     f"tuple starting with a tensor)")


class _Traced(nn.Module):
    """The traced function: a classifier's output, or a language model's logits without KV cache."""

    def __init__(self, model: nn.Module, lm: bool) -> None:
        super().__init__()
        self.model = model
        self.lm = lm
        self.hf = lm and hasattr(getattr(model, "config", None), "model_type")  # a transformers model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hf:  # all-ones mask: no packed-sequence check (torch.diff); no cache: whole sequence each call
            return _first_tensor(self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False))
        return _first_tensor(self.model(x))


def _trace(model: nn.Module, example: torch.Tensor, lm: bool) -> tuple[bytes, tuple[str, ...], tuple[str, ...]]:
    """The ONNX bytes of the (fake-quant) model, its input and output names."""
    names_in, names_out = (("input_ids",), ("logits",)) if lm else (("input",), ("output",))
    axes = {0: "batch", 1: "sequence"} if lm else {0: "batch"}
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's deprecation and TracerWarnings
            torch.onnx.export(_Traced(model, lm), (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=list(names_in), output_names=list(names_out),
                              dynamic_axes={names_in[0]: axes, names_out[0]: axes}, do_constant_folding=True)
    finally:
        model.train(was_training)
    return buf.getvalue(), names_in, names_out


# ---- the graph rewrite ---------------------------------------------------------------------------


def _key(a: np.ndarray) -> tuple:
    """Content key of a float32 array: shape and a digest of its bytes."""
    return tuple(a.shape), hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_nodes(graph, w: np.ndarray) -> list[tuple[object, str]]:
    """(node, how) for every MatMul/Gemm node whose weight input holds exactly ``w`` (N, K):
    how = "matmul" (A @ Wᵀ, no bias) or "gemm" (A @ Wᵀ + C)."""
    from onnx import numpy_helper

    want_w, want_t = _key(w), _key(w.T)
    w_names, t_names = set(), set()
    for init in graph.initializer:
        if init.data_type != 1 or len(init.dims) != 2:  # float32 matrices only
            continue
        a = numpy_helper.to_array(init)
        k = _key(a)
        if k == want_w:
            w_names.add(init.name)
        if k == want_t:
            t_names.add(init.name)
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in w_names
                  and list(_attr(n, "perm", [1, 0])) == [1, 0]}
    found = []
    for n in graph.node:
        if n.op_type == "MatMul" and (n.input[1] in t_names or n.input[1] in transposed):
            found.append((n, "matmul"))
        elif n.op_type == "Gemm" and not _attr(n, "transA", 0) and _attr(n, "alpha", 1.0) == 1.0 \
                and _attr(n, "beta", 1.0) == 1.0:
            tb = _attr(n, "transB", 0)
            if (tb and n.input[1] in w_names) or (not tb and n.input[1] in t_names):
                found.append((n, "gemm"))
    return found


def _nbits_initializers(prefix: str, nw: NBitsWeight) -> tuple[list, list[str]]:
    """The MatMulNBits initializers of one layer and the node's weight inputs (B, scales[, zero_points])."""
    from onnx import numpy_helper

    inits = [numpy_helper.from_array(nw.B.numpy(), f"{prefix}.B"),
             numpy_helper.from_array(nw.scales.float().numpy(), f"{prefix}.scales")]
    if nw.zero_points is not None:
        inits.append(numpy_helper.from_array(nw.zero_points.numpy(), f"{prefix}.zero_points"))
    return inits, [t.name for t in inits]


def _replace(graph, name: str, nodes: list, weight_inputs: list[str], nw: NBitsWeight) -> None:
    """Swap each MatMul/Gemm in ``nodes`` for a MatMulNBits node on ``weight_inputs`` (+ Add for a bias)."""
    from onnx import helper

    for i, (node, how) in enumerate(nodes):
        tag = f"{name}/MatMulNBits" + (f"_{i}" if i else "")
        out = node.output[0]
        bias = node.input[2] if how == "gemm" and len(node.input) > 2 and node.input[2] else None
        mm_out = f"{tag}_output" if bias else out
        new = [helper.make_node("MatMulNBits", [node.input[0], *weight_inputs], [mm_out], name=tag,
                                domain="com.microsoft", accuracy_level=0, **nw.attributes())]
        if bias:
            new.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{tag}_bias"))
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for j, n in enumerate(new):
            graph.node.insert(at + j, n)


def _drop_unused(graph) -> None:
    """Remove initializers that no node reads (the replaced float weights)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for attr in (a for n in graph.node for a in n.attribute if a.type == a.GRAPH):
        used |= {i for n in attr.g.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module, QuantizedWeight]]:
    """(name, module, QuantizedWeight) for every module with ``.qweight``, in module order."""
    return [(n, m, m.qweight) for n, m in model.named_modules() if getattr(m, "qweight", None) is not None]


def _same_nbits(a: NBitsWeight, b: NBitsWeight) -> bool:
    same = lambda x, y: (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))  # noqa: E731
    return a.attributes() == b.attributes() and same(a.B, b.B) and same(a.scales, b.scales) and \
        same(a.zero_points, b.zero_points)


def _rewrite(onnx_bytes: bytes, layers: list) -> tuple[object, list[OnnxLayer], int, list[str]]:
    """The ONNX model with the quantized Linear layers as MatMulNBits; the layer records, the
    MatMulNBits bytes, and notes."""
    import onnx
    from onnx import helper

    proto = onnx.load_from_string(onnx_bytes)
    graph = proto.graph
    records, notes = [], []
    done: dict[tuple, tuple[str, NBitsWeight]] = {}  # weight content → (layer, its tensors)
    quantized_bytes = 0
    for name, mod, qw in layers:
        shape = tuple(mod.weight.shape)
        if not isinstance(mod, nn.Linear):
            nbytes = mod.weight.numel() * 4
            records.append(OnnxLayer(name, "Conv (float)", qw.bits, shape, nbytes,
                                     note="float32 weight = its dequantized codes (MatMulNBits has no convolution)"))
            continue
        nw = nbits_weight(qw, name)  # ValueError naming the layer when there is no exact form
        w = mod.weight.detach().float()
        if not torch.equal(w, qw.dequantize().float().reshape(w.shape)):
            raise ValueError(f"layer '{name}': its weight is not its dequantized quantized weight (changed after "
                             f"quantization?); export the model as quantize left it")
        wn = w.numpy()
        key = _key(wn)
        if key in done:
            first, nw0 = done[key]
            if not _same_nbits(nw, nw0):
                raise ValueError(f"layer '{name}': same float weight as layer '{first}' but other codes or scales")
            records.append(OnnxLayer(name, "MatMulNBits", qw.bits, shape, 0, nw.block_size, nw.zero_point_kind,
                                     nw.blocks_per_group, note=f"shares the tensors of layer '{first}'"))
            continue
        nodes = _weight_nodes(graph, wn)
        if not nodes:
            raise ValueError(f"layer '{name}': the exporter emitted no MatMul/Gemm reading its weight (is the layer "
                             f"called as a module in forward?)")
        inits, inputs = _nbits_initializers(name, nw)
        graph.initializer.extend(inits)
        _replace(graph, name, nodes, inputs, nw)
        done[key] = (name, nw)
        quantized_bytes += nw.nbytes()
        note = "" if nw.blocks_per_group == 1 else \
            f"each scale repeated over {nw.blocks_per_group} blocks of {nw.block_size}"
        records.append(OnnxLayer(name, "MatMulNBits", qw.bits, shape, nw.nbytes(), nw.block_size, nw.zero_point_kind,
                                 nw.blocks_per_group, note=note))
    _drop_unused(graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    n_float = sum(r.op != "MatMulNBits" for r in records)
    if n_float:
        notes.append(f"{n_float} quantized convolution(s) kept as float Conv with their dequantized weights")
    return proto, records, quantized_bytes, notes


def _initializer_bytes(graph, skip: set[str]) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer if t.name not in skip)


def _reference(model: nn.Module, example: torch.Tensor, lm: bool) -> np.ndarray:
    """The fake-quant model's output on ``example`` (eval mode, restored after)."""
    was_training = model.training
    try:
        with torch.no_grad():
            return _Traced(model.eval(), lm)(example).float().numpy()
    finally:
        model.train(was_training)


def _run_onnxruntime(data: bytes, name: str, example: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {name: example.numpy()})[0]


def export_onnx(model: nn.Module, path, example: torch.Tensor, *, verify: bool = True) -> OnnxExport:
    """Write ``model`` to ``path`` as ONNX with its quantized Linear layers as MatMulNBits (see the
    module docstring) and return the report.

    Args:
        model: a fake-quant model (``sq.quantize``) or a packed one (``sq.load``); not modified.
        path: the .onnx file to write (atomically; missing folders are created).
        example: one input batch, on the CPU: float images/features for a classifier (its batch axis
            becomes dynamic), integer token ids (batch, sequence) for a language model (both axes
            dynamic; a Hugging Face causal LM is called with an all-ones attention mask and no cache).
        verify: run the written file in onnxruntime on ``example`` (when installed) and report the
            largest absolute difference from the fake-quant model's output.
    """
    import onnx  # noqa: F401  (needed by torch.onnx.export; a clear ImportError before any work)

    if not isinstance(example, torch.Tensor):
        raise ValueError(f"example must be a torch.Tensor (one input batch), got {type(example).__name__}")
    if example.device.type != "cpu":
        raise ValueError(f"example must be on the CPU, got {example.device}")
    lm = not (torch.is_floating_point(example) or torch.is_complex(example))
    for name, mod in model.named_modules():  # static input quantizers (act_bits) have no MatMulNBits form
        aq = getattr(mod, "input_quant", None) or getattr(mod, "act_quant", None)
        if aq is not None:
            raise ValueError(f"layer '{name or type(mod).__name__}': quantizes its input activations "
                             f"({aq.bits}-bit), which the ONNX export does not hold; export a weight-only run")
    fq = _fake_quant(model)
    layers = _quantized_layers(fq)
    for name, mod, qw in layers:  # refuse before tracing: one line naming the first layer that cannot be held
        if isinstance(mod, nn.Linear):
            nbits_weight(qw, name)
    raw, names_in, names_out = _trace(fq, example, lm)
    proto, records, q_bytes, notes = _rewrite(raw, layers)
    skip = {f"{r.name}.{t}" for r in records if r.op == "MatMulNBits" for t in ("B", "scales", "zero_points")}
    float_bytes = _initializer_bytes(proto.graph, skip)
    data = proto.SerializeToString()
    file = atomic_write_bytes(path, data)
    diff = None
    if not layers:
        notes.append("the model has no quantized layers: exported as float")
    if verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            notes.append("not verified: onnxruntime is not installed")
        else:
            ref = _reference(model, example, lm)  # the model as given (packed layers: their own kernels)
            got = _run_onnxruntime(data, names_in[0], example)
            diff = float(np.abs(got.astype(np.float64) - ref).max()) if got.shape == ref.shape else float("inf")
    return OnnxExport(file=Path(file), bytes=len(data), format="onnx", type="lm" if lm else "classifier",
                      opset=OPSET, exporter=EXPORTER, inputs=names_in, outputs=names_out, layers=tuple(records),
                      quantized_bytes=q_bytes, float_bytes=float_bytes, max_abs_diff=diff, notes=tuple(notes))
