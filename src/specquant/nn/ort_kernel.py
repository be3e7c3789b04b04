"""The fast CPU path of ``QuantLinear``: onnxruntime's MLAS ``MatMulNBits`` kernel on the layer's codes.

A packed 4-bit Linear layer builds, on its first eligible call, a one-node ONNX graph
``Y = MatMulNBits(A, B, scales[, zero_points])`` whose tensors are the layer's own codes and
scales (``core.nbits.nbits_weight``: exact, nothing re-rounded) and runs it in an
``onnxruntime.InferenceSession`` on the CPU.  The kernel dequantizes blocks on the fly and
multiplies in float32 (``accuracy_level`` 0: activations are not quantized), so outputs equal the
pure-PyTorch path (dequantize, then ``F.linear``) up to float rounding of the sums.

When it runs (``fast_path_reason`` / ``OrtLinearSlot.reason`` say why not, one line):

* ``onnxruntime`` (and ``onnx``) import — both are optional and imported here, lazily;
* the weight has an exact MatMulNBits form (``core.nbits.nbits_reason``) at a width whose MLAS
  kernel beats float32 GEMM (``FAST_WIDTHS``: 4 bits, with the grid's fixed or integer zero
  points; onnxruntime 1.32 runs 2- and 8-bit codes and float zero points through a reference loop
  that is slower than the float layer, so those stay on the PyTorch path);
* the input is a float32 CPU tensor with elements, no gradient is needed (grad mode off, or neither
  the input nor the bias requires grad), and nothing is tracing, scripting or exporting the model.

Threads: the session uses ``torch.get_num_threads()`` intra-op threads (and one inter-op thread),
read when it is built; a later change of the torch setting rebuilds it on the next call.  Spinning
of idle pool threads is turned off, so the session's threads do not compete with torch's.

Memory: the session holds the packed tensors and the kernel's pre-packed copy of them (about the
packed size again); ``nn.memory_bytes`` counts only the layer's tensors.  The session is never
saved, copied or pickled: ``copy.deepcopy`` and pickling give an empty slot that builds its own.
"""
from __future__ import annotations

import importlib.util

import torch

from specquant.core.nbits import NBitsWeight, nbits_reason, nbits_weight
from specquant.core.qweight import QuantizedWeight

FAST_WIDTHS = (4,)  # code widths whose MLAS float32 kernel is faster than a float32 nn.Linear here
KERNELS = ("auto", "torch", "onnxruntime")  # QuantLinear.kernel: choose, force the fallback, require the fast path


def onnxruntime_reason() -> str | None:
    """None when onnxruntime and onnx can be imported, else why not."""
    for mod in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'specquant[runtimes]')"
    return None


def weight_reason(qw: QuantizedWeight) -> str | None:
    """None when the fast kernel can run this weight, else why not (one line)."""
    why = nbits_reason(qw)
    if why is not None:
        return why
    if qw.bits not in FAST_WIDTHS:
        return (f"{qw.bits}-bit codes run slower in onnxruntime's MatMulNBits than in float32 (fast kernel: "
                f"{', '.join(map(str, FAST_WIDTHS))}-bit)")
    if nbits_weight(qw).zero_point_kind == "float":
        return "non-integer zero points run slower in onnxruntime's MatMulNBits than in float32"
    return None


def call_reason(x: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when a call on ``x`` can take the fast kernel, else why not (the per-call conditions)."""
    if x.device.type != "cpu":
        return f"the input is on {x.device}, the kernel runs on the CPU"
    if x.dtype != torch.float32:
        return f"the input is {str(x.dtype).removeprefix('torch.')}, the kernel takes float32"
    if x.numel() == 0:
        return "the input is empty"
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return "autograd needs the PyTorch path"
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return "the model is being traced, scripted or compiled"
    if torch.onnx.is_in_onnx_export():
        return "the model is being exported"
    return None


def build_session(nw: NBitsWeight, threads: int):
    """An ``onnxruntime.InferenceSession`` computing A (M, K) ↦ A @ Wᵀ (M, N) with the weight ``nw``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(nw.B.numpy(), "B"), numpy_helper.from_array(nw.scales.numpy(), "scales")]
    inputs = ["A", "B", "scales"]
    if nw.zero_points is not None:
        inits.append(numpy_helper.from_array(nw.zero_points.numpy(), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", accuracy_level=0,
                            **nw.attributes())
    graph = helper.make_graph([node], "quant_linear",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", nw.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", nw.N])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings of the graph optimizer are not the user's business
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class OrtLinearSlot:
    """A layer's onnxruntime session, built on first use; empty again after copy, pickle or ``reset``.

    ``reason(get_qw)`` checks once whether the weight can take the fast kernel at all (``get_qw``
    returns the layer's ``QuantizedWeight``, unpacked only when needed); ``run(get_qw, x2)``
    multiplies x2 (M, K) by the weight, building (or, after a change of ``torch.get_num_threads()``,
    rebuilding) the session.
    """

    def __init__(self) -> None:
        self._static: tuple[str | None] | None = None  # (reason or None,) once checked
        self._session = None
        self._threads = 0
        self._nw: NBitsWeight | None = None

    def reset(self) -> None:
        """Forget the session and the check (the weight or its device changed)."""
        self.__init__()

    def reason(self, get_qw) -> str | None:
        """None when the weight can take the fast kernel (and onnxruntime is installed), else why not."""
        if self._static is None:
            why = onnxruntime_reason()
            if why is None:
                qw = get_qw()
                why = weight_reason(qw)
                if why is None:
                    self._nw = nbits_weight(qw)
            self._static = (why,)
        return self._static[0]

    def run(self, get_qw, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) float32 CPU → x2 @ Wᵀ (M, N) through the session."""
        if self.reason(get_qw) is not None:
            raise ValueError(f"the onnxruntime kernel cannot run this layer: {self.reason(get_qw)}")
        threads = torch.get_num_threads()
        if self._session is None or self._threads != threads:
            self._session = build_session(self._nw, threads)
            self._threads = threads
        (y,) = self._session.run(None, {"A": x2.detach().contiguous().numpy()})
        return torch.from_numpy(y)  # (M, N)

    def __deepcopy__(self, memo) -> OrtLinearSlot:
        return OrtLinearSlot()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
