"""Cost of quantizing one decoder block against the model's width.

Random Llama-architecture models (transformers' ``LlamaForCausalLM``, fresh weights, seeded) of
hidden width d (intermediate 8d/3 rounded to a multiple of 64, head dim 64, 3 KV heads' worth of
grouped-query attention) with a few decoder layers; each is quantized with each method on the
same token windows, and the time per block is the quantize time divided by the number of
blocks.  The figures say how the engine scales, not how well a random model quantizes.

    OMP_NUM_THREADS=1 python benchmarks/lm_block_cost.py --out bench-out/lm_block_cost.json
    OMP_NUM_THREADS=1 python benchmarks/lm_block_cost.py --widths 128 256 --methods gptq --repeats 1

Times are medians over --repeats runs (the machine is shared: compare within one run).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _model(width: int, layers: int, vocab: int, seed: int):
    import torch
    import transformers

    heads = max(1, width // 64)
    kv = heads if heads < 3 else max(1, heads // 3)
    while heads % kv:
        kv -= 1
    inter = max(64, round(width * 8 / 3 / 64) * 64)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 576, 768])
    p.add_argument("--layers", type=int, default=2, help="decoder layers per model (default 2)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gpfq", "qronos"])
    p.add_argument("--windows", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--granularity", default="group:64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/lm_block_cost.json")
    args = p.parse_args(argv)

    import torch

    import specquant as sq
    from specquant.algorithms import make_config

    vocab = 1024
    ids = torch.randint(0, vocab, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for width in args.widths:
        base = _model(width, args.layers, vocab, args.seed)
        per_block = sum(m.weight.numel() for n, m in base.named_modules()
                        if type(m) is torch.nn.Linear and n.startswith("model.layers.0."))
        for method in args.methods:
            secs, rss = [], 0.0
            for _ in range(args.repeats):
                m = copy.deepcopy(base)
                cfg = make_config(method, bits=args.bits, granularity=args.granularity, symmetric=False,
                                  seed=args.seed)
                t0 = time.perf_counter()
                report = sq.quantize(m, cfg, calib=ids, progress=False)
                secs.append(time.perf_counter() - t0)
                rss = max(rss, report.peak_rss_mb)
            med = statistics.median(secs)
            rows.append({"width": width, "method": method, "block_weights": per_block, "layers": args.layers,
                         "tokens": args.windows * args.seq_len, "seconds": med,
                         "seconds_per_block": med / args.layers,
                         "ns_per_weight_token": med / args.layers / per_block / (args.windows * args.seq_len) * 1e9,
                         "peak_rss_mb": rss, "repeats": args.repeats})
            print(f"width {width:5d} {method:8s} {med / args.layers:8.2f} s/block", file=sys.stderr, flush=True)
    threads = {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "threads": threads, "bits": args.bits,
                               "granularity": args.granularity}, indent=2) + "\n")
    print(f"| width | block weights | {' | '.join(args.methods)} (s/block) |")
    print("| --- | --- | " + " | ".join("---" for _ in args.methods) + " |")
    for width in args.widths:
        r = {x["method"]: x for x in rows if x["width"] == width}
        w = r[args.methods[0]]["block_weights"]
        print(f"| {width} | {w:,} | " + " | ".join(f"{r[m]['seconds_per_block']:.2f}" for m in args.methods) + " |")
    print(f"threads: {threads}; {args.windows}x{args.seq_len} tokens; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
