"""Running quantized models where users run them: ONNX (onnxruntime MatMulNBits) and packed Linear layers.

Parts (each a function of the parsed arguments returning rows; ``main`` collects them in order):

``onnx_rows``    ``resnet20-cifar10``, ``mnist-mlp`` and ``stories260k`` quantized with RTN at 4 bits
                 (groups of 32; ResNet-20: per channel), exported with ``sq.export_onnx``; latency at
                 batch 1 and 32 (stories260k: sequences of ``--seq-len`` tokens) of the onnxruntime
                 MatMulNBits model against torch fp32 and onnxruntime fp32 of the same traced graph,
                 timed in interleaved rounds in the same run; the file's size against the tensors
                 the format dictates (MatMulNBits codes + scales + zero points, float initializers);
                 the max abs output difference from specquant's fake-quant model on that batch.
``linear_rows``  one 4096×4096 layer at 4 bits (groups of 128) and 8 bits (per channel), batch 1
                 and 32: ``QuantLinear`` with the default kernel choice (4 bits: onnxruntime's
                 MatMulNBits; 8 bits: the PyTorch path, plus the int8 dynamic mode) against fp32
                 ``nn.Linear`` and the pure-PyTorch fallback (``kernel="torch"``); medians and ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/runtimes.py [--out bench-out/runtimes.json] [--threads 1]
                                                          [--quick] [--data-dir DIR]

One intra-op thread by default (torch and onnxruntime alike): on a shared 2-core machine two
OpenMP threads wait on each other.  A model whose data is missing gives a row saying so.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import specquant as sq
from specquant.core.quantizer import quantize_tensor
from specquant.io.files import write_json
from specquant.models.zoo import get_model
from specquant.nn import QuantLinear

ONNX_MODELS = (("resnet20-cifar10", "channel"), ("mnist-mlp", "group:32"), ("stories260k", "group:32"))
BATCHES = (1, 32)


def log(msg: str) -> None:
    print(f"[runtimes] {msg}", file=sys.stderr, flush=True)


def time_interleaved(fns: dict, reps: int, warmup: int = 2, budget_s: float = 30.0) -> dict[str, float]:
    """Median ms of each callable, timed in interleaved rounds (a load change hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        start = time.perf_counter()
        for r in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
            if r >= 4 and time.perf_counter() - start > budget_s:
                break
    return {k: statistics.median(ts) for k, ts in times.items()}


@dataclass
class OnnxRow:
    """One model at one batch size in onnxruntime."""

    part: str  # "onnx"
    model: str
    batch: int
    quant: str  # what was exported, e.g. "rtn w4 group:32"
    torch_fp32_ms: float | None = None  # the float model in torch
    ort_fp32_ms: float | None = None  # the float model's graph in onnxruntime
    ort_nbits_ms: float | None = None  # the exported MatMulNBits graph in onnxruntime
    speedup_vs_torch_fp32: float | None = None  # torch_fp32_ms / ort_nbits_ms
    speedup_vs_ort_fp32: float | None = None  # ort_fp32_ms / ort_nbits_ms
    file_bytes: int | None = None  # the .onnx file
    tensor_bytes: int | None = None  # what the format dictates: MatMulNBits tensors + float initializers
    matmulnbits_bytes: int | None = None
    float_bytes: int | None = None
    fp32_file_bytes: int | None = None  # the float graph's file
    max_abs_diff: float | None = None  # onnxruntime MatMulNBits vs specquant's fake-quant model, this batch
    max_abs_output: float | None = None  # the largest |output| of the fake-quant model (scale of the above)
    float_layers: int | None = None  # quantized layers kept float (convolutions)
    skipped: str | None = None


@dataclass
class LinearRow:
    """One 4096x4096 layer at one width and batch size."""

    part: str  # "linear"
    bits: int
    granularity: str
    batch: int
    fp32_ms: float
    quant_ms: float  # QuantLinear, default kernel choice
    fallback_ms: float  # QuantLinear, kernel="torch"
    kernel: str  # what the default choice ran: "onnxruntime MatMulNBits" or "PyTorch" (see kernel_reason)
    speedup_vs_fp32: float  # fp32_ms / quant_ms
    speedup_vs_fallback: float  # fallback_ms / quant_ms
    int8_dynamic_ms: float | None = None  # 8 bits: the int8 dynamic mode
    int8_speedup_vs_fp32: float | None = None
    max_abs_diff_vs_fallback: float | None = None


def _session(path_or_bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _inputs(mid: str, entry, data_dir, seq_len: int) -> dict[int, torch.Tensor]:
    """Batch size → one input batch (seeded)."""
    if entry.kind == "lm":
        windows = entry.calib(max(BATCHES), 0, data_dir, seq_len=seq_len)
        return {b: windows[:b].contiguous() for b in BATCHES}
    x = entry.calib(max(BATCHES), 0, data_dir)
    return {b: x[:b].contiguous() for b in BATCHES}


def onnx_rows(args) -> list[OnnxRow]:
    """The ONNX part (see the module docstring)."""
    from specquant.export.onnx import _trace, _Traced  # the very tracer export_onnx uses, for the fp32 graph

    rows: list[OnnxRow] = []
    for mid, gran in ONNX_MODELS:
        quant = f"rtn w4 {gran}"
        try:
            model, entry = get_model(mid, args.data_dir)
        except Exception as e:  # noqa: BLE001 - a missing data folder or file: say so in the row
            rows += [OnnxRow("onnx", mid, b, quant, skipped=f"{type(e).__name__}: {str(e)[:120]}") for b in BATCHES]
            continue
        lm = entry.kind == "lm"
        inputs = _inputs(mid, entry, args.data_dir, args.seq_len)
        fp32 = copy.deepcopy(model).eval()
        calib = entry.calib(8 if lm else 256, 1, args.data_dir, **({"seq_len": args.seq_len} if lm else {}))
        t0 = time.perf_counter()
        sq.quantize(model, sq.RTNConfig(bits=4, granularity=gran), calib=calib, progress=False)
        log(f"{mid}: quantized in {time.perf_counter() - t0:.1f} s")
        with tempfile.TemporaryDirectory() as tmp:
            rep = sq.export_onnx(model, Path(tmp) / f"{mid}.onnx", inputs[1])
            fp32_bytes, names_in, _ = _trace(fp32, inputs[1], lm)
            s_q, s_f = _session(rep.file, args.threads), _session(fp32_bytes, args.threads)
            f_torch, f_fq = _Traced(fp32, lm).eval(), _Traced(model, lm).eval()
            for b, x in inputs.items():
                feed = {names_in[0]: x.numpy()}
                ms = time_interleaved({"torch": lambda x=x, m=f_torch: m(x),
                                       "ort_fp32": lambda f=feed, s=s_f: s.run(None, f),
                                       "ort_nbits": lambda f=feed, s=s_q: s.run(None, f)}, args.reps)
                with torch.no_grad():
                    ref = f_fq(x).numpy()
                diff = float(np.abs(s_q.run(None, feed)[0].astype(np.float64) - ref).max())
                rows.append(OnnxRow(
                    "onnx", mid, b, quant, ms["torch"], ms["ort_fp32"], ms["ort_nbits"],
                    ms["torch"] / ms["ort_nbits"], ms["ort_fp32"] / ms["ort_nbits"], rep.bytes, rep.tensor_bytes,
                    rep.quantized_bytes, rep.float_bytes, len(fp32_bytes), diff, float(np.abs(ref).max()),
                    sum(r.op != "MatMulNBits" for r in rep.layers)))
                log(f"{mid} b{b}: torch {ms['torch']:.2f} ms, ort fp32 {ms['ort_fp32']:.2f}, "
                    f"ort nbits {ms['ort_nbits']:.2f}; diff {diff:.2e}")
    return rows


def linear_rows(args) -> list[LinearRow]:
    """The packed-Linear part (see the module docstring)."""
    rows: list[LinearRow] = []
    n = 1024 if args.quick else 4096
    torch.manual_seed(0)
    lin = nn.Linear(n, n).eval()
    for bits, gran in ((4, "group:128"), (8, "channel")):
        qw = quantize_tensor(lin.weight.detach(), bits=bits, granularity=gran)
        auto = QuantLinear.from_quantized(lin, qw)
        fallback = QuantLinear.from_quantized(lin, qw, kernel="torch")
        int8 = QuantLinear.from_quantized(lin, qw, mode="int8_dynamic") if bits == 8 else None
        for b in BATCHES:
            x = torch.randn(b, n, generator=torch.Generator().manual_seed(b))
            fns = {"fp32": lambda x=x: lin(x), "quant": lambda x=x, m=auto: m(x),
                   "fallback": lambda x=x, m=fallback: m(x)}
            if int8 is not None:
                fns["int8"] = lambda x=x, m=int8: m(x)
            ms = time_interleaved(fns, args.reps)
            why = auto.kernel_reason(x)
            with torch.no_grad():
                diff = float((auto(x) - fallback(x)).abs().max())
            rows.append(LinearRow(
                "linear", bits, gran, b, ms["fp32"], ms["quant"], ms["fallback"],
                "onnxruntime MatMulNBits" if why is None else "PyTorch", ms["fp32"] / ms["quant"],
                ms["fallback"] / ms["quant"], ms.get("int8"), ms["fp32"] / ms["int8"] if "int8" in ms else None, diff))
            log(f"linear {n}x{n} w{bits} b{b}: fp32 {ms['fp32']:.2f} ms, quant {ms['quant']:.2f}, "
                f"fallback {ms['fallback']:.2f}" + (f", int8 {ms['int8']:.2f}" if "int8" in ms else ""))
    return rows


ROW_FUNCTIONS = (onnx_rows, linear_rows)  # main() collects rows from each, in this order


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_table(rows: list) -> None:
    """One table per part: a column per field that some row of the part fills."""
    for part in dict.fromkeys(r.part for r in rows):
        sel = [r for r in rows if r.part == part]
        cols = [f.name for f in fields(sel[0]) if f.name != "part" and any(getattr(r, f.name) is not None for r in sel)]
        cells = [[_cell(getattr(r, c)) for c in cols] for r in sel]
        width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        print(f"\n{part}")
        print("  " + " ".join(c.rjust(w) for c, w in zip(cols, width)))
        for row in cells:
            print("  " + " ".join(v.rjust(w) for v, w in zip(row, width)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/runtimes.json", help="JSON output path")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and onnxruntime)")
    p.add_argument("--reps", type=int, default=21, help="timing rounds (medians)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence for the language model")
    p.add_argument("--quick", action="store_true", help="a 1024x1024 layer instead of 4096x4096")
    p.add_argument("--data-dir", default=None, help="the data directory (default: the zoo's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for fn in ROW_FUNCTIONS for row in fn(args)]
    import onnxruntime

    result = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "seq_len": args.seq_len,
              "rows": [asdict(r) if is_dataclass(r) else r for r in rows]}
    write_json(args.out, result)
    print(f"torch {result['torch']}, onnxruntime {result['onnxruntime']}, {args.threads} thread(s); medians in ms")
    print_table(rows)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
