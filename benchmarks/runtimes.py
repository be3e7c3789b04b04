"""Running quantized models where users run them: ONNX (onnxruntime MatMulNBits) and packed Linear layers.

Parts (each a function of the parsed arguments returning rows; ``main`` collects them in order):

``onnx_rows``    ``resnet20-cifar10``, ``mnist-mlp`` and ``stories260k`` quantized with RTN at 4 bits
                 (groups of 32; ResNet-20: per channel), exported with ``sq.export_onnx``; latency at
                 batch 1 and 32 (stories260k: sequences of ``--seq-len`` tokens) of the onnxruntime
                 MatMulNBits model against torch fp32 and onnxruntime fp32 of the same traced graph,
                 timed in interleaved rounds in the same run; the file's size against the tensors
                 the format dictates (MatMulNBits codes + scales + zero points, float initializers);
                 the max abs output difference from specquant's fake-quant model on that batch.
``gguf_rows``    GGUF files in llama.cpp (``llama-cpp-python``), specquant's rounding against llama.cpp's
                 own quantizer, side by side, per model (``--gguf-models``) and GGUF type
                 (``--gguf-types``): ``float`` = the float model written as an all-F32 GGUF by
                 ``sq.export_gguf``; ``llama-quantize`` = llama.cpp's quantizer (the library call
                 behind the ``llama-quantize`` tool; default recipe, token embeddings and output kept
                 F32 as in specquant's protocol) on that float GGUF; ``specquant:M`` = the model
                 quantized by method M on the same block grid (``--gguf``: groups of 32, fp16
                 scales, symmetric for Q4_0/Q8_0, asymmetric with 7-bit fp16 scales for Q4_1; layers
                 whose input width is not a multiple of 32 stay float and are written F16, as
                 llama.cpp's quantizer does) from ``--calib`` windows of the WikiText-2 validation
                 text, exported exactly.  Every file is run by llama.cpp itself: perplexity on the
                 first ``--eval-windows`` windows of ``--gguf-seq-len`` tokens of the WikiText-2 test
                 text (specquant's token ids and perplexity code on llama.cpp's logits; for
                 specquant's files also the perplexity of the same model in specquant,
                 ``ppl_specquant``: the 1 % agreement check), prompt and generation tokens/s (medians
                 of ``--gguf-repeats``), file size against the bytes the format dictates.
``linear_rows``  one 4096×4096 layer at 4 bits (groups of 128) and 8 bits (per channel), batch 1
                 and 32: ``QuantLinear`` with the default kernel choice (4 bits: onnxruntime's
                 MatMulNBits; 8 bits: the PyTorch path, plus the int8 dynamic mode) against fp32
                 ``nn.Linear`` and the pure-PyTorch fallback (``kernel="torch"``); medians and ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/runtimes.py [--out bench-out/runtimes.json] [--threads 1]
                                                          [--quick] [--data-dir DIR] [--parts onnx linear gguf]
    PYTHONPATH=src .venv/bin/python benchmarks/runtimes.py --parts gguf --gguf-models smollm2-135m \
        --calib 16 --gguf-seq-len 512 --eval-windows 40

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
from size_speed import time_interleaved as _interleaved  # benchmarks/ is the script's folder
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


def time_interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median ms of each callable, timed in interleaved rounds (size_speed.time_interleaved: at least 5
    rounds, then stop once 30 s have passed)."""
    return {k: v["median_ms"] for k, v in _interleaved(fns, reps, budget_s=30.0, min_rounds=5).items()}


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


# GGUF type -> specquant's grid that holds it exactly (the CLI's --gguf): bits, symmetric, scale dtype
GGUF_TYPES = {"Q4_0": (4, True, "float16"), "Q4_1": (4, False, "float16-q4_1"), "Q8_0": (8, True, "float16")}


@dataclass
class GgufRow:
    part: str  # "gguf"
    model: str  # zoo id
    type: str  # GGUF type of the quantized weights ("F32" for the float file)
    source: str  # "float", "llama-quantize" or "specquant:METHOD"
    bytes: int  # file size
    expected_tensor_bytes: int | None  # tensor bytes the format dictates (specquant's files)
    ppl_llamacpp: float  # perplexity of the file in llama.cpp
    ppl_specquant: float | None  # perplexity of the same model in specquant (its own files)
    agreement: float | None  # ppl_llamacpp / ppl_specquant - 1
    prompt_tok_s: float  # llama.cpp prompt processing, tokens/s (median)
    gen_tok_s: float  # llama.cpp generation one token at a time, tokens/s (median)
    quant_seconds: float | None  # time to quantize (llama.cpp's quantizer or specquant's method)
    predicted_tokens: int  # tokens scored by the perplexity
    seq_len: int  # window length
    tensor_types: str | None  # the file's tensor types


def _llama_speed(llamacpp, path, prompt, gen, repeats, threads):
    runs = []
    with llamacpp.LlamaCppModel(path, n_ctx=len(prompt) + gen + 1, threads=threads) as m:
        for _ in range(repeats):
            runs.append(m.speed(prompt, gen))
    return (statistics.median(r.prompt_tokens_per_s for r in runs),
            statistics.median(r.gen_tokens_per_s for r in runs))


def gguf_rows(args) -> list[GgufRow]:
    """The GGUF part (see the module docstring)."""
    from specquant.algorithms import ModuleSettings, make_config
    from specquant.eval.perplexity import perplexity
    from specquant.export import llamacpp
    from specquant.export.gguf import export_gguf, gguf_float_layers, vocab_for_entry

    threads, rows = args.threads, []
    tmp = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    for model_id in args.gguf_models:
        model, entry = get_model(model_id, args.data_dir)
        vocab = vocab_for_entry(entry, int(model.config.vocab_size), args.data_dir)
        ids, _ = entry.test(args.data_dir)
        prompt = ids[:args.prompt].tolist()
        L = args.gguf_seq_len  # noqa: N806 - the window length, as in the docs

        def row(source, kind, path, res=None, ppl_sq=None, quant_s=None, ids=ids, prompt=prompt, model_id=model_id,
                L=L):  # noqa: N803
            with llamacpp.LlamaCppModel(path, n_ctx=L, threads=threads) as m:
                r = perplexity(m, ids, L, args.eval_windows)
            pp, gen = _llama_speed(llamacpp, path, prompt, args.gen, args.gguf_repeats, threads)
            out = GgufRow("gguf", model_id, kind, source, path.stat().st_size,
                          res.expected_bytes if res is not None else None, r.perplexity, ppl_sq,
                          None if ppl_sq is None else r.perplexity / ppl_sq - 1, pp, gen, quant_s, r.predicted, L,
                          ",".join(sorted(set(res.tensors.values()))) if res is not None else None)
            log(str(asdict(out)))
            rows.append(out)

        f32 = tmp / f"{model_id}-f32.gguf"
        res = export_gguf(model, f32, vocab, name=model_id)
        row("float", "F32", f32, res, ppl_sq=perplexity(model, ids, L, args.eval_windows).perplexity)
        calib = entry.calib(args.calib, args.seed, args.data_dir, seq_len=L)
        float_layers = gguf_float_layers(model)
        for kind in args.gguf_types:
            lq = tmp / f"{model_id}-llama-{kind}.gguf"
            t0 = time.perf_counter()
            llamacpp.llama_quantize(f32, lq, kind, threads=threads)
            row("llama-quantize", kind, lq, quant_s=time.perf_counter() - t0)
            lq.unlink()
            for method in args.gguf_methods:
                m, _ = get_model(model_id, args.data_dir)
                bits, symmetric, scale_dtype = GGUF_TYPES[kind]
                cfg = make_config(method, bits=bits, symmetric=symmetric, granularity="group:32",
                                  scale_dtype=scale_dtype, seed=args.seed,
                                  modules={n: ModuleSettings(skip=True) for n in float_layers})
                rep = sq.quantize(m, cfg, calib=calib)
                ppl_sq = perplexity(m, ids, L, args.eval_windows).perplexity
                out = tmp / f"{model_id}-{method}-{kind}.gguf"
                res = export_gguf(m, out, vocab, name=model_id, float_type="F16")  # as llama.cpp's fallback
                row(f"specquant:{method}", kind, out, res, ppl_sq=ppl_sq, quant_s=rep.seconds)
                out.unlink()
                del m
        f32.unlink()
    return rows


ROW_FUNCTIONS = {"onnx": onnx_rows, "linear": linear_rows, "gguf": gguf_rows}  # main() runs --parts in this order


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5g}" if abs(v) < 1e4 else f"{v:.0f}"
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
    p.add_argument("--parts", nargs="+", choices=list(ROW_FUNCTIONS), default=list(ROW_FUNCTIONS),
                   help="which parts to run (default: all)")
    p.add_argument("--gguf-models", nargs="+", default=["stories260k", "smollm2-135m"], help="gguf: zoo ids")
    p.add_argument("--gguf-types", nargs="+", default=list(GGUF_TYPES), choices=list(GGUF_TYPES), help="gguf: types")
    p.add_argument("--gguf-methods", nargs="+", default=["gptq", "qronos"], help="gguf: specquant methods")
    p.add_argument("--calib", type=int, default=16, help="gguf: calibration windows (default 16)")
    p.add_argument("--gguf-seq-len", type=int, default=256, help="gguf: tokens per window (default 256)")
    p.add_argument("--eval-windows", type=int, default=40, help="gguf: test windows scored (default 40)")
    p.add_argument("--prompt", type=int, default=128, help="gguf: prompt tokens for the speed test (default 128)")
    p.add_argument("--gen", type=int, default=64, help="gguf: tokens generated for the speed test (default 64)")
    p.add_argument("--gguf-repeats", type=int, default=3, help="gguf: speed runs per file, medians (default 3)")
    p.add_argument("--seed", type=int, default=0, help="gguf: calibration seed (default 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for part in ROW_FUNCTIONS if part in args.parts for row in ROW_FUNCTIONS[part](args)]
    import onnxruntime

    result = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "seq_len": args.seq_len,
              "rows": [asdict(r) if is_dataclass(r) else r for r in rows]}
    write_json(args.out, result)
    print(f"torch {result['torch']}, onnxruntime {result['onnxruntime']}, {args.threads} thread(s); medians in ms "
          "(gguf: tokens/s)")
    print_table(rows)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
