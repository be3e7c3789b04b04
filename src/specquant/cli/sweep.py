"""``specquant sweep MODEL --methods M... --bits B... [--seeds S...] [--nproc N] [-- QUANTIZE OPTIONS]``:
every (method, width, seed) quantized and scored as ``specquant quantize`` would, one table, the
Pareto front and a recommendation.

Each job is one ``specquant quantize MODEL --method M --bits B --seed S OPTIONS`` run in this
process (the options after ``--`` are quantize's own: ``--calib``, ``--granularity``,
``--asymmetric``, ``--protect``, ``--limit``, ``--seq-len``, ...), without a run folder; the float
model is scored once per seed (the calibration draw and a ``--limit`` test subset depend on it).

Over several ranks (``--nproc N`` on this machine, or ``torchrun``; cli/distributed.py) the jobs
are dealt out, job k (in method, width, seed order) on rank k mod N, each run whole by its rank
(its calibration is not split); the figures of every job travel as one float64 matrix summed over
the ranks, every entry written by one rank, and rank 0 prints the table and the JSON.  Scores and
sizes are those of one process; the seconds are each job's own (ranks share the machine's cores).
The Pareto front and the recommendation (``report.decide.mark_sweep``) are per seed, against that
seed's float score.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from specquant.cli.common import UI, CLIError, emit_json, entry_metric
from specquant.cli.distributed import run_ranks, world_size
from specquant.engine.distributed import Dist
from specquant.report.decide import mark_sweep
from specquant.report.table import format_table

# quantize options a sweep sets itself (or that would write files per job): refused after "--"
OWN_OPTIONS = ("--method", "--bits", "--seed", "--avg-bits", "--policy", "--per-channel-bits", "--out", "--overwrite",
               "--json", "--quiet", "--nproc", "--dist-timeout", "--max-memory")
FIGURES = ("score", "float_score", "bits_per_weight", "size_vs_float", "quant_seconds", "eval_seconds",
           "peak_rss_mb")  # the numbers of one job that travel between ranks, in this order


@dataclass(frozen=True)
class SweepJob:
    """One run of the sweep."""

    method: str  # --method
    bits: int  # --bits
    seed: int  # --seed


def sweep_jobs(methods, bits, seeds) -> list[SweepJob]:
    """The jobs in method, width, seed order (duplicates dropped, first kept)."""
    out: list[SweepJob] = []
    for m in methods:
        for b in bits:
            for s in seeds:
                job = SweepJob(m, b, s)
                if job not in out:
                    out.append(job)
    return out


def job_argv(args, job: SweepJob) -> list[str]:
    """The ``specquant quantize`` command line of one job."""
    return ["quantize", args.model, "--method", job.method, "--bits", str(job.bits), "--seed", str(job.seed),
            *args.passthrough, "--quiet"]


def _check_passthrough(options: list[str]) -> None:
    for opt in options:
        name = opt.split("=", 1)[0]
        if name in OWN_OPTIONS:
            raise CLIError(f"sweep: {name} after '--' is set by the sweep itself (--methods, --bits, --seeds, "
                           "--nproc, --json) or writes per-job files; leave it out")


def _parse_job(args, job: SweepJob):
    """(quantize args, config, entry) of one job; every quantize check runs here, before any work."""
    from specquant.cli.parser import build_parser  # the parser imports this module
    from specquant.cli.quantize import quantize_config

    qargs = build_parser().parse_args(job_argv(args, job))
    config, entry = quantize_config(qargs)
    return qargs, config, entry


def cmd_sweep(args, argv: list[str]) -> int:
    args.passthrough = list(args.passthrough or [])
    _check_passthrough(args.passthrough)
    jobs = sweep_jobs(args.methods, args.bits, args.seeds)
    qargs, _, entry = _parse_job(args, jobs[0])  # one-line errors for bad options before any rank starts
    for job in jobs[1:]:
        _parse_job(args, job)
    args.device, args.out = qargs.device, None  # what the rank launcher reads
    if world_size(args, "sweep") > 1:  # --nproc N, or a rank started by it or by torchrun
        return run_ranks(args, argv, lambda dist: _sweep(args, jobs, _score_kind(entry, qargs), dist))
    return _sweep(args, jobs, _score_kind(entry, qargs))


def _score_kind(entry, qargs) -> tuple[str, bool | None]:
    """(the score's JSON key, whether lower is better; None when unknown: a user metric)."""
    if entry.kind == "lm":
        return "perplexity", True
    if entry_metric(entry, qargs) is not None:
        return "metric", None
    return "accuracy", False


def _sweep(args, jobs: list[SweepJob], kind: tuple[str, bool | None], dist: Dist | None = None) -> int:
    """Run this rank's jobs; on rank 0 print the table and JSON.  ``kind``: (score key, lower is
    better), the same for every job of one model."""
    from specquant.cli.quantize import run_quantize

    world, rank = (1, 0) if dist is None else (dist.world, dist.rank)
    helper = rank != 0
    ui = UI(args.quiet or helper)
    mine = [k for k in range(len(jobs)) if k % world == rank]
    figures = torch.zeros(len(jobs), len(FIGURES), dtype=torch.float64)  # (jobs, figures)
    float_cache: dict = {}
    key, lower = kind
    t0 = time.perf_counter()
    ui.say(f"sweep: {len(jobs)} runs of {args.model}" + (f" over {world} ranks" if world > 1 else ""))
    for done, k in enumerate(mine, 1):
        job = jobs[k]
        qargs, config, entry = _parse_job(args, job)
        m = run_quantize(qargs, job_argv(args, job), UI(True), config, None, entry, float_cache=float_cache)
        float_key = "float_" + key
        row = {"score": m[key], "float_score": m[float_key], "bits_per_weight": m["bits_per_weight"],
               "size_vs_float": m["size_vs_float"], "quant_seconds": m["quant_seconds"],
               "eval_seconds": m["eval_seconds"], "peak_rss_mb": m["peak_rss_mb"]}
        figures[k] = torch.tensor([float(row[f]) for f in FIGURES], dtype=torch.float64)
        spent = time.perf_counter() - t0
        ui.say(f"  [{done}/{len(mine)}] {job.method} {job.bits} bits seed {job.seed}: {key} {m[key]:.4g} "
               f"(float {m[float_key]:.4g}), {m['bits_per_weight']:.3f} bits/weight, {m['quant_seconds']:.1f} s; "
               f"about {spent * (len(mine) - done) / done:.0f} s left")
    if dist is not None:
        figures = dist.sum_tensor(figures)
        comm = dist.sum_int(dist.received_bytes)
    if helper:
        return 0
    rows = []
    for job, vals in zip(jobs, figures.tolist()):
        f = dict(zip(FIGURES, vals))
        rows.append({**asdict(job), key: f["score"], "float_" + key: f["float_score"],
                     **{n: f[n] for n in FIGURES[2:]}})
    result: dict = {"command": "sweep", "model": args.model, "options": args.passthrough, "score": key,
                    "runs": rows, "total_seconds": time.perf_counter() - t0}
    if lower is not None:  # per seed: each seed has its own calibration draw and (with --limit) test subset
        result["recommended"] = []
        for seed in dict.fromkeys(r["seed"] for r in rows):
            group = [r for r in rows if r["seed"] == seed]
            rec = mark_sweep(group, group[0]["float_" + key], score_key=key, perplexity=lower)
            result["recommended"].append({"seed": seed, **rec.to_dict(),
                                          "run": None if rec.index is None else group[rec.index]})
    if dist is not None:
        result.update({"nproc": dist.world, "comm_bytes": comm})
    cols = [("method", "method"), ("bits", "bits"), ("seed", "seed"), (key, key), ("float_" + key, "float"),
            ("bits_per_weight", "bits/weight (file)"), ("size_vs_float", "× smaller"),
            ("quant_seconds", "quant s"), ("pareto", "Pareto"), ("recommended", "recommended")]
    ui.say("")
    ui.say(format_table(rows, [c for c in cols if any(c[0] in r for r in rows)]))
    ui.say("")
    for r in result.get("recommended", []):
        ui.say(f"seed {r['seed']}: " + (f"no recommendation ({r['rule']})" if r["run"] is None else
               f"recommended {r['run']['method']} at {r['run']['bits']} bits ({r['rule']})"))
    if args.json:
        emit_json(result)
    return 0
