"""GGUF files in llama.cpp: specquant's rounding against llama.cpp's own quantizer, side by side.

For each model and GGUF type (Q4_0, Q4_1, Q8_0), in one run and one process per model:

* ``float``: the float model written as an all-F32 GGUF by ``specquant.export_gguf``;
* ``llama-quantize``: llama.cpp's quantizer (``llama_model_quantize``, the library call behind the
  ``llama-quantize`` tool; default recipe, token embeddings and output kept F32 as in specquant's
  protocol) applied to that float GGUF;
* ``specquant:M``: the model quantized by method M on the same block grid (``--gguf``: groups of
  32, fp16 scales, symmetric for Q4_0/Q8_0, asymmetric with 7-bit fp16 scales for Q4_1; layers
  whose input width is not a multiple of 32 stay float, written as F16 as llama.cpp's fallback
  does) from calibration windows of the WikiText-2 validation text, then exported exactly (no
  re-rounding).

Every file is run by llama.cpp itself (``llama-cpp-python``): perplexity on the first
``--eval-windows`` windows of ``--seq-len`` tokens of the WikiText-2 test text (the token ids are
specquant's, scored by specquant's perplexity code on llama.cpp's logits), prompt and generation
speed (median of ``--repeats``), file size against the bytes the format dictates.  For specquant's
files the perplexity of the same quantized model in specquant is reported too (``ppl_specquant``,
the agreement check of the issue: within 1 %).

    python benchmarks/gguf_runtime.py --models stories260k --calib 64 --seq-len 256 --eval-windows 40
    python benchmarks/gguf_runtime.py --models smollm2-135m --calib 16 --seq-len 512 --eval-windows 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# GGUF type -> specquant's grid that it holds exactly (the CLI's --gguf): bits, symmetric, scale dtype
TYPES = {"Q4_0": (4, True, "float16"), "Q4_1": (4, False, "float16-q4_1"), "Q8_0": (8, True, "float16")}


def _speed(llamacpp, path, prompt, gen, repeats, threads):
    runs = []
    with llamacpp.LlamaCppModel(path, n_ctx=len(prompt) + gen + 1, threads=threads) as m:
        for _ in range(repeats):
            runs.append(m.speed(prompt, gen))
    return (statistics.median(r.prompt_tokens_per_s for r in runs),
            statistics.median(r.gen_tokens_per_s for r in runs))


def _score(llamacpp, path, ids, a, threads):
    from specquant.eval.perplexity import perplexity

    with llamacpp.LlamaCppModel(path, n_ctx=a.seq_len, threads=threads) as m:
        return perplexity(m, ids, a.seq_len, a.eval_windows)


def gguf_rows(a) -> list[dict]:
    """One row per (model, type, source) with size, llama.cpp perplexity and speed."""
    import torch

    import specquant as sq
    from specquant.algorithms import ModuleSettings, make_config
    from specquant.eval.perplexity import perplexity
    from specquant.export import llamacpp
    from specquant.export.gguf import export_gguf, gguf_float_layers, vocab_for_entry
    from specquant.models import get_model

    threads = a.threads
    torch.set_num_threads(threads)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    for model_id in a.models:
        model, entry = get_model(model_id, a.data_dir)
        vocab = vocab_for_entry(entry, int(model.config.vocab_size), a.data_dir)
        ids, _ = entry.test(a.data_dir)
        prompt = ids[:a.prompt].tolist()
        base = dict(model=model_id, seq_len=a.seq_len, eval_windows=a.eval_windows, threads=threads)

        def row(source, kind, path, res=None, ppl_sq=None, quant_s=None, ids=ids, prompt=prompt, base=base):
            r = _score(llamacpp, path, ids, a, threads)
            pp, gen = _speed(llamacpp, path, prompt, a.gen, a.repeats, threads)
            out = dict(base, source=source, type=kind, bytes=path.stat().st_size, ppl_llamacpp=r.perplexity,
                       predicted_tokens=r.predicted, prompt_tok_s=pp, gen_tok_s=gen)
            if res is not None:
                out["expected_tensor_bytes"] = res.expected_bytes
                out["tensor_types"] = sorted(set(res.tensors.values()))
            if ppl_sq is not None:
                out["ppl_specquant"] = ppl_sq
                out["agreement"] = r.perplexity / ppl_sq - 1
            if quant_s is not None:
                out["quant_seconds"] = quant_s
            rows.append(out)
            print(json.dumps(out), flush=True)

        f32 = tmp / f"{model_id}-f32.gguf"
        res = export_gguf(model, f32, vocab, name=model_id)
        row("float", "F32", f32, res, ppl_sq=perplexity(model, ids, a.seq_len, a.eval_windows).perplexity)
        calib = entry.calib(a.calib, a.seed, a.data_dir, seq_len=a.seq_len)
        float_layers = gguf_float_layers(model)
        for kind in a.types:
            lq = tmp / f"{model_id}-llama-{kind}.gguf"
            t0 = time.perf_counter()
            llamacpp.llama_quantize(f32, lq, kind, threads=threads)
            row("llama-quantize", kind, lq, quant_s=time.perf_counter() - t0)
            for method in a.methods:
                m, _ = get_model(model_id, a.data_dir)
                bits, symmetric, scale_dtype = TYPES[kind]
                cfg = make_config(method, bits=bits, symmetric=symmetric, granularity="group:32",
                                  scale_dtype=scale_dtype, seed=a.seed,
                                  modules={n: ModuleSettings(skip=True) for n in float_layers})
                rep = sq.quantize(m, cfg, calib=calib)
                ppl_sq = perplexity(m, ids, a.seq_len, a.eval_windows).perplexity
                out = tmp / f"{model_id}-{method}-{kind}.gguf"
                res = export_gguf(m, out, vocab, name=model_id, float_type="F16")  # as llama.cpp's fallback
                row(f"specquant:{method}", kind, out, res, ppl_sq=ppl_sq, quant_s=rep.seconds)
                del m
            lq.unlink()
        f32.unlink()
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ("model", "type", "source", "bytes", "ppl_llamacpp", "ppl_specquant", "prompt_tok_s", "gen_tok_s")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["stories260k", "smollm2-135m"])
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    p.add_argument("--methods", nargs="+", default=["gptq", "qronos"], help="specquant methods (default gptq qronos)")
    p.add_argument("--calib", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--eval-windows", type=int, default=40, help="test windows scored (default 40)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the speed test (default 128)")
    p.add_argument("--gen", type=int, default=64, help="generated tokens for the speed test (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="speed runs per file; medians (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    p.add_argument("--data-dir", default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.add_argument("--out", default="bench-out/gguf_runtime.json")
    a = p.parse_args(argv)
    rows = gguf_rows(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
