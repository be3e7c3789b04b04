"""Out-of-core quantization of a ~1.5B-parameter Llama under ``--max-memory 3GB``.

1. Writes once (``--workdir``, reused when present) a synthetic Llama-architecture model with
   random weights (normal, std 0.02; norms 1; seeded) as sharded safetensors with an index,
   tensor by tensor, one shard (≤ 1 GB) in memory at a time: the whole model never is.
2. Quantizes it with each method (GPTQ, GPFQ; W4, groups of 128) through
   ``sq.quantize_folder(..., max_memory=...)``, each in a fresh subprocess: its peak RSS (from
   ``getrusage``), the time of each block and the total.  Calibration: ``--calib`` windows of
   ``--seq-len`` uniformly random token ids (seeded; the model has no tokenizer).
   ``--blocks N`` stops each run after N blocks (its figures then say so and the total is
   extrapolated from the mean block time, labelled as such).
3. Identity: a smaller model of the same family (``--small-*``) quantized in memory
   (``sq.quantize`` + ``sq.save``) and out of core; every stored tensor compared bit for bit.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/out_of_core.py --workdir /tmp/sq-ooc --out bench-out/ooc.json
    python benchmarks/out_of_core.py --layers 2 --hidden 256 --intermediate 512 --vocab 1024 --max-memory 1GB  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

MB = 2**20


def write_synthetic(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, heads: int,
                    seed: int = 0, shard_bytes: int = 10**9) -> int:
    """A random Llama as sharded safetensors + index + config.json; returns its parameter count.
    Tensors are generated one at a time and written a shard at a time."""
    import transformers
    from safetensors.torch import save_file

    from specquant.io.files import write_json
    from specquant.models.hf import empty_parameters

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    with empty_parameters():
        skeleton = transformers.LlamaForCausalLM(cfg)
    params = list(skeleton.state_dict().items())
    folder.mkdir(parents=True, exist_ok=True)
    shard, size, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for i, (key, p) in enumerate(params):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        t = torch.ones(p.shape) if key.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
        total += t.numel()
        if size + 4 * t.numel() > shard_bytes and shard:
            flush()
            size = 0
        shard[key] = t
        size += 4 * t.numel()
    flush()
    cfg.save_pretrained(folder)
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": 4 * total}, "weight_map": weight_map})
    (folder / "DONE").write_text(str(total))
    return total


def ensure_model(folder: Path, **kw) -> int:
    if (folder / "DONE").is_file():
        return int((folder / "DONE").read_text())
    t0 = time.perf_counter()
    n = write_synthetic(folder, **kw)
    print(f"wrote {n / 1e9:.2f}B parameters to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return n


def calib_tokens(n: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def config_for(method: str, bits: int, group: int):
    import specquant as sq

    cls = {"gptq": sq.GPTQConfig, "gpfq": sq.GPFQConfig}[method]
    return cls(bits=bits, granularity=f"group:{group}")


def child(args) -> None:
    """One out-of-core run (in its own process): prints one JSON line."""
    import specquant as sq

    torch.set_num_threads(1)
    cfg = config_for(args.method, args.bits, args.group)
    if args.head_only:  # every decoder block in float (run forward only), the head quantized
        from specquant.algorithms.base import ModuleSettings

        cfg.modules.update({f"model.layers.{i}.*": ModuleSettings(skip=True) for i in range(args.layers)})
    elif args.blocks:  # stop after N blocks: the rest of the layers (and the head) stay in float, never read
        from specquant.algorithms.base import ModuleSettings

        cfg.modules.update({f"model.layers.{i}.*": ModuleSettings(skip=True) for i in range(args.blocks, args.layers)})
        cfg.modules["lm_head"] = ModuleSettings(skip=True)
    calib = calib_tokens(args.calib, args.seq_len, args.vocab)
    budget = None if args.activation_budget is None else int(args.activation_budget * MB)
    res = sq.quantize_folder(args.folder, cfg, calib, args.outfile, max_memory=args.max_memory, batch_size=args.calib,
                             activation_budget=budget, progress=False, workdir=args.tmp)
    print(json.dumps({"peak_rss_mb": res.report.peak_rss_mb, "layers": len(res.report.layers),
                      "quant_seconds": res.report.seconds, "file_mb": Path(res.path).stat().st_size / MB,
                      **res.to_dict()}), flush=True)


def run_child(args, folder: Path, method: str, outfile: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--method", method, "--outfile", str(outfile),
           "--max-memory", args.max_memory, "--calib", str(args.calib), "--seq-len", str(args.seq_len),
           "--vocab", str(args.vocab), "--bits", str(args.bits), "--group", str(args.group),
           "--layers", str(args.layers), "--blocks", str(args.blocks or 0), "--tmp", str(args.workdir)]
    if args.activation_budget is not None:
        cmd += ["--activation-budget", str(args.activation_budget)]
    if args.head_only:
        cmd += ["--head-only"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"method": method, "error": (p.stderr.strip().splitlines() or ["?"])[-1], "wall_seconds": wall}
    return {"method": method, "wall_seconds": wall, **json.loads(p.stdout.strip().splitlines()[-1])}


def identity(args) -> dict:
    """In-memory vs out-of-core on a small model of the same family: every stored tensor equal?"""
    import functools

    import transformers
    from safetensors import safe_open

    import specquant as sq

    torch.set_num_threads(1)
    folder = Path(args.workdir) / "small"
    n = ensure_model(folder, layers=args.small_layers, hidden=args.small_hidden,
                     intermediate=args.small_intermediate, vocab=args.small_vocab, heads=args.small_heads)
    calib = calib_tokens(args.calib, args.seq_len, args.small_vocab)
    out = {}
    for method in args.methods:
        cfg = config_for(method, args.bits, args.group)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        sq.quantize(model, cfg, calib=calib, batch_size=args.calib, progress=False)
        build = functools.partial(transformers.AutoModelForCausalLM.from_config,
                                  transformers.AutoConfig.from_pretrained(folder))
        mem, ooc = Path(args.workdir) / f"small-{method}-mem.sq", Path(args.workdir) / f"small-{method}-ooc.sq"
        sq.save(model, mem, arch=build)
        del model
        sq.quantize_folder(folder, cfg, calib, ooc, max_memory=args.max_memory, batch_size=args.calib,
                           activation_budget=0, progress=False, workdir=args.workdir)
        with safe_open(str(mem), "pt") as a, safe_open(str(ooc), "pt") as b:
            keys = set(a.keys())
            same = keys == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
        out[method] = {"params": n, "tensors": len(keys), "identical": same}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/specquant-ooc-bench", help="model folders and temporary files")
    ap.add_argument("--out", default="bench-out/out_of_core.json")
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--small-layers", type=int, default=4)
    ap.add_argument("--small-hidden", type=int, default=256)
    ap.add_argument("--small-intermediate", type=int, default=512)
    ap.add_argument("--small-heads", type=int, default=4)
    ap.add_argument("--small-vocab", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", default=["gptq", "gpfq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows (random token ids)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-memory", default="3GB")
    ap.add_argument("--blocks", type=int, default=0, help="stop each run after N decoder blocks (0: all)")
    ap.add_argument("--activation-budget", type=float, default=None,
                    help="MiB of cached block activations kept in memory, the rest spilled to memory-mapped files "
                         "(default: quantize_folder's, half the room the limit leaves; 0: spill everything)")
    ap.add_argument("--head-only", action="store_true",
                    help="quantize the lm_head only (the decoder blocks run in float): its peak memory alone")
    ap.add_argument("--skip-identity", action="store_true")
    ap.add_argument("--identity-only", action="store_true",
                    help="only the in-memory vs out-of-core comparison on the small model (no 1.5B runs)")
    # the child process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--outfile", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from specquant.io.files import write_json

    work = Path(args.workdir)
    folder = work / f"llama-{args.layers}x{args.hidden}-{args.intermediate}-v{args.vocab}"
    n = 0
    if not args.identity_only:
        n = ensure_model(folder, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                         vocab=args.vocab, heads=args.heads)
        print(f"model: {n / 1e9:.3f}B parameters, {4 * n / 1e9:.2f} GB in float32, {folder}", flush=True)
    runs = []
    for method in ([] if args.identity_only else args.methods):
        r = run_child(args, folder, method, work / f"{folder.name}-{method}.sq")
        if "block_seconds" in r:
            secs = [b["seconds"] for b in r["block_seconds"]]
            r["median_block_seconds"] = sorted(secs)[len(secs) // 2]
            r["max_block_rss_mb"] = max(b["rss_mb"] for b in r["block_seconds"])  # after a block was dropped
            if args.blocks:
                r["extrapolated_total_seconds"] = r["median_block_seconds"] * (args.layers + 1)
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "block_seconds"}), flush=True)
    result = {"model": {"params": n, "layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                        "vocab": args.vocab, "float32_gb": 4 * n / 1e9} if n else None,
              "settings": {"bits": args.bits, "group": args.group, "calib_windows": args.calib,
                           "seq_len": args.seq_len, "calib_tokens": "uniform random ids, seeded",
                           "max_memory": args.max_memory, "blocks": args.blocks or "all",
                           "activation_budget_mib": args.activation_budget, "head_only": args.head_only,
                           "threads": 1, "cpus_on_machine": os.cpu_count()},
              "runs": runs}
    if not args.skip_identity:
        result["identity"] = identity(args)
    write_json(Path(args.out), result)
    print(f"\n{'method':8} {'peak RSS MiB':>13} {'limit MiB':>10} {'blocks':>7} {'median s/block':>15} "
          f"{'total s':>9} {'spilled MiB':>12} {'RSS between blocks MiB':>23}")
    for r in runs:
        if "error" in r:
            print(f"{r['method']:8} error: {r['error']}")
            continue
        print(f"{r['method']:8} {r['peak_rss_mb']:13.0f} {r['max_memory_mb']:10.0f} {r['blocks']:7d} "
              f"{r['median_block_seconds']:15.1f} {r['out_of_core_seconds']:9.0f} {r['spilled_mb']:12.1f} "
              f"{r['max_block_rss_mb']:23.0f}")
    for m, v in result.get("identity", {}).items():
        print(f"identity {m}: {v['tensors']} tensors of a {v['params'] / 1e6:.0f}M-parameter model, "
              f"identical to the in-memory run: {v['identical']}")


if __name__ == "__main__":
    main()
