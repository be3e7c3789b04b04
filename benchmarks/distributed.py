"""Data-parallel calibration: 1 rank against N ranks on one machine, and a cost model from it.

Each run quantizes the same model with the same calibration windows in fresh processes (one per
rank, gloo over 127.0.0.1, ``--threads`` threads each) through ``specquant.quantize(..., dist=...)``
(engine/distributed.py): every rank streams a contiguous shard of the calibration batches, the
statistics are exchanged, each layer's algorithm runs on its owner and the codes are broadcast.
The script asserts that every run gives the very codes and scales of the 1-rank run, and reports
the wall time of ``quantize`` (median over --repeats), the algorithm's share, the time spent in
broadcasts (transfer and waiting for the sender) and the bytes each rank received, per block.

From the 1-rank figures it fits a cost model (effective rates of this machine for the statistics
pass and the algorithm; see ``cost_model``) and projects the time to quantize Llama-3-8B and
Llama-3-70B shapes on N machines; its assumptions are printed and stored in the JSON.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py --out bench-out/distributed.json
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --calib 4 --seq-len 128 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- one rank (a fresh process)


def worker(rank: int, world: int, port: int, out: str, args) -> None:
    """One rank: load the model and windows, quantize (its shard), write its figures to ``out``."""
    import torch

    torch.set_num_threads(args.threads)
    import specquant as sq
    import specquant.engine.apply as apply_mod
    from specquant.algorithms import make_config
    from specquant.models.data import data_dir
    from specquant.models.zoo import get_entry

    entry = get_entry(args.model)
    model = entry.load(data_dir()).eval()
    calib = entry.calib(args.calib, args.seed, data_dir(), seq_len=args.seq_len)
    dist = None
    if world > 1:
        import torch.distributed as tdist

        from specquant.engine.distributed import Dist

        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        dist = Dist.current()
    algo = {"seconds": 0.0}
    run = apply_mod._run

    def timed_run(*a, **k):  # the algorithm's own time (and, with ranks, the result's broadcast)
        t0 = time.perf_counter()
        try:
            return run(*a, **k)
        finally:
            algo["seconds"] += time.perf_counter() - t0
    apply_mod._run = timed_run
    cfg = make_config(args.method, bits=args.bits, granularity=args.granularity, symmetric=False, seed=args.seed)
    t0 = time.perf_counter()
    report = sq.quantize(model, cfg, calib=calib, batch_size=args.batch_size, progress=False, dist=dist)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight"):
            for t in (mod.qweight.codes, mod.qweight.scale, mod.qweight.zero_point):
                digest.update(name.encode() + t.contiguous().cpu().numpy().tobytes())
    blocks = len({r.name.rsplit(".", 2)[0] for r in report.layers})
    result = {"rank": rank, "world": world, "seconds": seconds, "algorithm_seconds": algo["seconds"],
              "comm_seconds": dist.comm_seconds if dist else 0.0, "received_bytes": dist.received_bytes if dist else 0,
              "sent_bytes": dist.sent_bytes if dist else 0, "blocks": blocks, "layers": len(report.layers),
              "tokens": int(calib.numel()), "codes_sha256": digest.hexdigest(), "peak_rss_mb": report.peak_rss_mb}
    Path(out).write_text(json.dumps(result))
    if dist is not None:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def run_ranks(world: int, args, tmp: Path) -> list[dict]:
    """One run over ``world`` ranks (fresh processes); each rank's figures."""
    from specquant.cli.distributed import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    flags = ["--model", args.model, "--method", args.method, "--bits", str(args.bits), "--granularity",
             args.granularity, "--calib", str(args.calib), "--seq-len", str(args.seq_len), "--batch-size",
             str(args.batch_size), "--seed", str(args.seed), "--threads", str(args.threads)]
    outs = [tmp / f"w{world}-r{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE), "--worker", str(r), str(world), str(port), str(outs[r]),
                               *flags], env=env) for r in range(world)]
    for p in procs:
        if p.wait() != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"a rank of the {world}-rank run failed (status {p.returncode})")
    return [json.loads(o.read_text()) for o in outs]


# --------------------------------------------------------------------------- the cost model

# Linear layers of one decoder block as (name, inputs N0, outputs), and which share one statistics pass.
def llama_block(d: int, inter: int, kv: int) -> list[tuple[str, int, int]]:
    return [("q", d, d), ("k", d, kv), ("v", d, kv), ("o", d, d), ("gate", d, inter), ("up", d, inter),
            ("down", inter, d)]


STAT_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # one H, G per group

SHAPES = {  # d, intermediate, K/V width, blocks (Hugging Face configs)
    "smollm2-135m": (576, 1536, 192, 30),
    "llama-3-8b": (4096, 14336, 1024, 32),
    "llama-3-70b": (8192, 28672, 1024, 80),
}


def block_work(shape: tuple[int, int, int, int], tokens: int) -> dict:
    """Operation counts of one block: the statistics pass (the block's forward on the float and the
    quantized model, H = X̃ᵀX̃ and G = X̃ᵀX per statistics group, the output energies), the GPTQ-type
    algorithm per layer (N0³ for the Cholesky factor and inverse, 2·out·N0² for the column updates),
    and the bytes of one statistics node (H and G in float64 per group) and of the results (uint8
    codes; scales are 1/128 of that at g128 and ignored)."""
    d, inter, kv, _ = shape
    layers = {n: (n0, out) for n, n0, out in llama_block(d, inter, kv)}
    fwd = sum(2 * 2 * tokens * n0 * out for n0, out in layers.values())  # float and quantized forwards
    prods = sum(2 * 2 * tokens * layers[g[0]][0] ** 2 for g in STAT_GROUPS)  # H and G
    energy = sum(2 * tokens * n0 * out for n0, out in layers.values())
    alg = sum(n0 ** 3 + 2 * out * n0 ** 2 for n0, out in layers.values())
    node = sum(2 * 8 * layers[g[0]][0] ** 2 for g in STAT_GROUPS)
    codes = sum(n0 * out for n0, out in layers.values())
    return {"stats_flop": fwd + prods + energy, "alg_flop": alg, "node_bytes": node, "result_bytes": codes}


def cost_model(one: dict, two: list[dict], args) -> dict:
    """Rates fitted on the 1-rank run; projections for 8B and 70B shapes on N machines."""
    tokens, blocks = one["tokens"], one["blocks"]
    w = block_work(SHAPES["smollm2-135m"], tokens)
    t_block = one["seconds"] / blocks
    t_alg = one["algorithm_seconds"] / blocks
    t_stats = t_block - t_alg
    rates = {"stats_flop_per_s": w["stats_flop"] / t_stats, "alg_flop_per_s": w["alg_flop"] / t_alg}
    # Bytes per block a rank receives with N ranks: the other ranks' nodes (one each when every shard
    # holds a power-of-two number of batches) and the results of the layers it does not own.
    predicted_2 = w["node_bytes"] + w["result_bytes"] / 2
    measured_2 = statistics.mean(r["received_bytes"] for r in two) / blocks if two else None
    proj_tokens = args.project_tokens
    hardware = {
        "this machine (1 thread per rank, loopback)": (rates["stats_flop_per_s"], rates["alg_flop_per_s"],
                                                       _loopback_rate(two, blocks)),
        "assumed GPU node (50 TFLOP/s statistics, 5 TFLOP/s GPTQ loop, 100 Gb/s)": (50e12, 5e12, 12.5e9),
        "assumed GPU node on 10 Gb/s Ethernet": (50e12, 5e12, 1.25e9),
    }
    projections = []
    for model in ("llama-3-8b", "llama-3-70b"):
        shape = SHAPES[model]
        wm = block_work(shape, proj_tokens)
        for hw, (r_stats, r_alg, bw) in hardware.items():
            if bw is None:
                continue
            for n in (1, 2, 8, 16):
                t_s = wm["stats_flop"] / r_stats / n
                t_a = wm["alg_flop"] / r_alg
                # each rank's node goes to the n-1 others, broadcast after broadcast from each rank
                t_c = (n * (n - 1) * wm["node_bytes"] + (n - 1) * wm["result_bytes"]) / bw if n > 1 else 0.0
                projections.append({"model": model, "hardware": hw, "machines": n, "tokens": proj_tokens,
                                    "blocks": shape[3], "hours": shape[3] * (t_s + t_a + t_c) / 3600,
                                    "stats_s_per_block": t_s, "alg_s_per_block": t_a, "comm_s_per_block": t_c,
                                    "node_gb": wm["node_bytes"] / 1e9})
    return {"rates": rates, "measured_block_seconds": {"stats": t_stats, "algorithm": t_alg},
            "bytes_per_block_2_ranks": {"predicted": predicted_2, "measured": measured_2},
            "assumptions": ASSUMPTIONS, "projections": projections}


def _loopback_rate(two: list[dict], blocks: int) -> float | None:
    """Bytes per second the 2-rank run moved inside its broadcasts (waiting included: a lower bound)."""
    if not two:
        return None
    t = max(r["comm_seconds"] for r in two)
    return sum(r["received_bytes"] for r in two) / t if t > 0 else None


ASSUMPTIONS = [
    "statistics work per block = forward of the float and the quantized block (2·tokens·Σ out·N0 each), "
    "H and G (2·tokens·N0² each per statistics group: q/k/v, o, gate/up, down) and the output energies; "
    "attention's tokens² term is left out",
    "statistics split evenly over the N ranks (contiguous shards of the calibration windows)",
    "the algorithm (GPTQ: N0³ + 2·out·N0² per layer) runs once per layer on its owner while the others "
    "wait: it does not get faster with N in this implementation",
    "communication per block: every rank's statistics node (H and G in float64 per group) is broadcast to "
    "the N-1 others, one broadcast after another (N·(N-1)·node bytes over one link's bandwidth), plus the "
    "uint8 codes of the layers; latency and overlap with compute are ignored",
    "rates of 'this machine' are fitted on the 1-rank smollm2 run (one shared core); the GPU rates and "
    "network bandwidths are assumptions, not measurements",
    "every rank holds the whole model and its shard's cached block inputs (memory not modelled)",
]


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--granularity", default="group:128")
    p.add_argument("--calib", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per batch (default 1: 8 batches, 4 a rank)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--project-tokens", type=int, default=128 * 2048,
                   help="calibration tokens of the projections (default 128 windows of 2048)")
    p.add_argument("--out", default="bench-out/distributed.json")
    p.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        rank, world, port, out = args.worker
        worker(int(rank), int(world), int(port), out, args)
        return 0

    tmp = Path(args.out).with_suffix(".ranks")
    tmp.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[list[dict]]] = {n: [] for n in args.ranks}
    for _ in range(args.repeats):
        for n in args.ranks:  # interleaved, so that load on the shared machine hits both alike
            runs[n].append(run_ranks(n, args, tmp))
    ref = runs[args.ranks[0]][0][0]["codes_sha256"]
    for n, reps in runs.items():
        for rep in reps:
            for r in rep:
                assert r["codes_sha256"] == ref, f"{n} ranks, rank {r['rank']}: codes differ from the 1-rank run"
    rows = []
    for n, reps in runs.items():
        def med(key, reps=reps):
            return statistics.median(max(r[key] for r in rep) for rep in reps)
        blocks = reps[0][0]["blocks"]
        rows.append({"ranks": n, "threads_per_rank": args.threads, "quant_seconds": med("seconds"),
                     "algorithm_seconds": med("algorithm_seconds"), "comm_seconds": med("comm_seconds"),
                     "received_mb_per_block_per_rank": statistics.mean(r["received_bytes"] for r in reps[0]) / blocks
                     / 1e6, "blocks": blocks, "tokens": reps[0][0]["tokens"],
                     "codes_identical": True, "codes_sha256": ref, "peak_rss_mb": med("peak_rss_mb"),
                     "all_seconds": [max(r["seconds"] for r in rep) for rep in reps]})
    base = rows[0]["quant_seconds"]
    for row in rows:
        row["speedup_vs_1"] = base / row["quant_seconds"]
    model = cost_model(runs[1][0][0] if 1 in runs else runs[args.ranks[0]][0][0],
                       runs[2][0] if 2 in runs else [], args)
    result = {"meta": {"model": args.model, "method": args.method, "bits": args.bits,
                       "granularity": args.granularity, "calib": args.calib, "seq_len": args.seq_len,
                       "batch_size": args.batch_size, "repeats": args.repeats, "threads_per_rank": args.threads,
                       "cpus": os.cpu_count(), "note": "shared machine: other jobs ran; medians of interleaved runs"},
              "rows": rows, "cost_model": model}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'ranks':>5} {'quant s':>8} {'alg s':>7} {'comm s':>7} {'MB/block/rank':>14} {'speedup':>8}  codes")
    for r in rows:
        print(f"{r['ranks']:>5} {r['quant_seconds']:>8.1f} {r['algorithm_seconds']:>7.1f} {r['comm_seconds']:>7.1f} "
              f"{r['received_mb_per_block_per_rank']:>14.1f} {r['speedup_vs_1']:>8.2f}  identical")
    b = model["bytes_per_block_2_ranks"]
    if b["measured"] is not None:
        print(f"bytes per block per rank, 2 ranks: predicted {b['predicted'] / 1e6:.1f} MB, "
              f"measured {b['measured'] / 1e6:.1f} MB")
    print(f"fitted rates: statistics {model['rates']['stats_flop_per_s'] / 1e9:.1f} GFLOP/s, "
          f"algorithm {model['rates']['alg_flop_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"\n{'model':<12} {'machines':>8} {'hours':>9} {'stats s/blk':>11} {'alg s/blk':>9} "
          f"{'comm s/blk':>10}  hardware")
    for q in model["projections"]:
        print(f"{q['model']:<12} {q['machines']:>8} {q['hours']:>9.2f} {q['stats_s_per_block']:>11.1f} "
              f"{q['alg_s_per_block']:>9.1f} {q['comm_s_per_block']:>10.1f}  {q['hardware']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
