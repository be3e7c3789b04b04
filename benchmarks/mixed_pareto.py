"""Mixed precision under a bit budget: accuracy against average bits, and does κ predict sensitivity?

For ``resnet20-cifar10`` and ``mnist-mlp`` (a model whose data is missing is skipped with a
message), with the same quantizer everywhere (``GPFQConfig()`` defaults: per-channel, symmetric,
output-MSE step, activation order; ``--calib`` training images as calibration data):

* uniform widths (``--uniform``, default 2, 3, 4);
* the policies of :mod:`specquant.mixed` at each average budget (``--budgets``, default 2.25,
  2.5, 3.0): ``spectral`` (the note's rule ⌈log₂ κ⌉ + b_base fitted to the budget),
  ``spectral-knapsack`` (the rule's error model M·κ²·4^-b solved exactly), ``sensitivity``
  (RTN-measured per-layer sensitivities, exact knapsack), ``sensitivity+protect`` (the same with
  the first and last layers held at ``--protect-bits``, default 8) and ``sensitivity-gpfq``
  (GPFQ-measured sensitivities);
* the per-layer sensitivity: each layer alone quantized at each candidate width, relative
  squared output error on ``--sens-calib`` calibration images, measured twice: by RTN
  (``RTNConfig()``: per-channel, MSE clipping; a cheap proxy) and by GPFQ itself
  (``--sens-methods``); policy ``sensitivity-gpfq`` uses the latter;
* the Spearman rank correlation between per-layer statistics (κ, κ of the weight with unit-norm
  rows (per-channel quantization ignores row scale, κ does not), the lock width ⌈log₂ κ⌉,
  stable and effective rank, excess kurtosis, outlier share, ‖W‖_op, parameters, and the RTN
  weight noise ‖W−Q_b(W)‖²/‖W‖² as a non-spectral baseline) and the measured sensitivity at
  2, 3 and 4 bits (``scipy.stats.spearmanr``; statistics of the BN-folded weights).

Goal (issue 5): at 2.5 average bits the best policy reaches at least uniform 3-bit accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mixed_pareto.py [--quick] \
        [--out bench-out/mixed_pareto.json] [--plots bench-out/mixed_pareto]

Average bits are stored code bits over the quantized layers (Σ M_l·s(b_l) / Σ M_l, s = 1.6 for the
3-level 2-bit grid, whose codes are stored five per byte, else s = b); the true storage with the
fp16 scales (``bits_per_weight``) is reported next to them.  ``sensitivity-gpfq-channel`` allocates
per output channel (one width per row, the layer's measured cost split over its rows); in the
"bits per layer" column a ``*`` marks a layer whose rows mix widths.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from specquant.algorithms import GPFQConfig, RTNConfig
from specquant.diagnostics.analyze import analyze
from specquant.engine.apply import quantize
from specquant.mixed import allocate, measure_sensitivity
from specquant.models.data import DataNotFoundError, data_dir
from specquant.models.zoo import evaluate, get_model

POLICIES = {  # name -> (allocate policy, protect first/last, sensitivity method, granularity)
    "spectral": ("spectral", False, None, "layer"),
    "spectral-knapsack": ("spectral-knapsack", False, None, "layer"),
    "sensitivity": ("sensitivity", False, "rtn", "layer"),
    "sensitivity+protect": ("sensitivity", True, "rtn", "layer"),
    "sensitivity-gpfq": ("sensitivity", False, "gpfq", "layer"),
    "sensitivity-gpfq-channel": ("sensitivity", False, "gpfq", "channel"),
}
STATS = ("kappa", "kappa_rownorm", "lock_bits", "stable_rank", "effective_rank", "excess_kurtosis",
         "outlier_share", "op_norm", "params", "weight_nsr")


def git_state() -> str | None:
    """The commit and whether the tree has local changes (results depend on the working tree)."""
    import subprocess

    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def json_safe(x):
    """Non-finite floats become None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def spearman(xs, ys) -> dict:
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and not math.isnan(x)
             and not math.isnan(y)]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return {"rho": None, "p": None, "n": len(pairs)}
    r = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(pairs)}


def run_quant(model, cfg, calib, xt, yt) -> dict:
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    rep = quantize(q, cfg, calib, progress=False)
    secs = time.perf_counter() - t0
    acc = evaluate(q, xt, yt)
    return {"accuracy": acc, "avg_bits": rep.avg_bits, "bits_per_weight": rep.bits_per_weight,
            "quant_seconds": secs, "bits": {r.name: r.bits for r in rep.layers},
            "row_widths": {r.name: {str(b): r.row_bits.count(b) for b in sorted(set(r.row_bits))}
                           for r in rep.layers if r.row_bits is not None}}


def bench_model(model_id: str, args) -> dict | None:
    try:
        root = data_dir(args.data_dir)
        model, entry = get_model(model_id, root)
        calib = entry.calib(args.calib, args.seed, root)
        xt, yt = entry.test(root)
    except (DataNotFoundError, FileNotFoundError) as e:
        log(f"[mixed_pareto] skipping {model_id}: data missing ({e})")
        return None
    if args.test and args.test < xt.shape[0]:
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(xt.shape[0], generator=g)[: args.test]
        xt, yt = xt[idx], yt[idx]
    out: dict = {"model": model_id, "n_calib": calib.shape[0], "n_test": xt.shape[0]}
    out["float_accuracy"] = evaluate(model, xt, yt)
    log(f"[{model_id}] float accuracy {out['float_accuracy']:.2f} % on {xt.shape[0]} test images")

    t0 = time.perf_counter()
    rep = analyze(model, calib[: args.sens_calib], bits=(2, 3, 4), bound_bits=4)
    out["analysis_seconds"] = time.perf_counter() - t0
    out["analysis"] = rep.to_dict()
    out["end_to_end"] = out["analysis"]["end_to_end"]
    log(rep.format_table())

    cands = tuple(args.candidates)
    sens_all = {}
    for method in args.sens_methods:
        cfg = GPFQConfig(symmetric=args.symmetric) if method == "gpfq" else RTNConfig(symmetric=args.symmetric)
        sens = measure_sensitivity(model, calib[: args.sens_calib], cands, cfg, metric=args.metric)
        sens_all[method] = sens
        log(sens.format_table())
        log(f"[{model_id}] sensitivities measured in {sens.seconds:.1f} s ({method}, {sens.n_samples} images)")
    out["sensitivity"] = {m: s.to_dict() for m, s in sens_all.items()}

    layers = {la.name: la for la in rep.layers}
    names = next(iter(sens_all.values())).names
    rownorm = rownorm_kappas(model, calib[: args.sens_calib])
    stat_vals: dict[str, list] = {s: [] for s in STATS}
    for n in names:
        la = layers[n]
        for s in STATS:
            if s == "weight_nsr":
                continue
            v = rownorm[n] if s == "kappa_rownorm" else getattr(la, s)
            stat_vals[s].append(None if v is None else float(v))
    corr: dict = {}
    for method, sens in sens_all.items():
        corr[method] = {}
        for b in (2, 3, 4):
            if b not in cands:
                continue
            ys = sens.at(b)
            nsr = [10 ** (-layers[n].error(b).sqnr_db / 10) for n in names]
            corr[method][str(b)] = {s: spearman(nsr if s == "weight_nsr" else stat_vals[s], ys) for s in STATS}
        log(format_corr(model_id, method, corr[method], len(names)))
    out["spearman"] = corr
    out["per_layer"] = [
        {"name": n, "params": layers[n].params, "kappa": layers[n].kappa, "kappa_rownorm": rownorm[n],
         "lock_bits": layers[n].lock_bits, "stable_rank": layers[n].stable_rank,
         "excess_kurtosis": layers[n].excess_kurtosis,
         "sensitivity": {m: {str(b): c for b, c in s.layers[i].costs.items()} for m, s in sens_all.items()}}
        for i, n in enumerate(names)
    ]

    runs = []
    for b in args.uniform:
        r = run_quant(model, GPFQConfig(bits=b, symmetric=args.symmetric), calib, xt, yt)
        r.update({"policy": "uniform", "budget": float(b)})
        runs.append(r)
        log(f"[{model_id}] uniform {b} bits: {r['accuracy']:.2f} % ({r['quant_seconds']:.1f} s)")
    for budget in args.budgets:
        for pname in args.policies:
            policy, protect, smethod, gran = POLICIES[pname]
            if smethod is not None and smethod not in sens_all:
                log(f"[{model_id}] {pname}: skipped ({smethod} sensitivities not measured)")
                continue
            try:
                alloc = allocate(model, calib, budget, policy, cands, protect_first_last=protect,
                                 protect_bits=args.protect_bits, granularity=gran,
                                 method_config=GPFQConfig(symmetric=args.symmetric),
                                 sensitivity=sens_all[smethod] if smethod is not None else None)
            except ValueError as e:
                log(f"[{model_id}] {pname} @ {budget}: {e}")
                runs.append({"policy": pname, "budget": budget, "error": str(e)})
                continue
            r = run_quant(model, alloc.apply(GPFQConfig(symmetric=args.symmetric)), calib, xt, yt)
            r.update({"policy": pname, "budget": budget, "predicted_cost": alloc.predicted_cost,
                      "b_base": alloc.b_base})
            runs.append(r)
            log(f"[{model_id}] {pname} @ {budget}: {r['accuracy']:.2f} % at {r['avg_bits']:.3f} bits "
                f"({r['quant_seconds']:.1f} s)")
    out["runs"] = runs
    u3 = next((r["accuracy"] for r in runs if r["policy"] == "uniform" and r["budget"] == 3.0), None)
    at25 = [r for r in runs if r["policy"] != "uniform" and r.get("budget") == 2.5 and "accuracy" in r]
    best = max(at25, key=lambda r: r["accuracy"]) if at25 else None
    out["goal"] = {
        "uniform3_accuracy": u3,
        "best_at_2.5": None if best is None else {"policy": best["policy"], "accuracy": best["accuracy"],
                                                  "avg_bits": best["avg_bits"]},
        "met": None if (u3 is None or best is None) else best["accuracy"] >= u3,
    }
    return out


def rownorm_kappas(model, calib) -> dict:
    """κ of each BN-folded weight with its rows scaled to unit norm (zero rows dropped).

    Per-channel quantization is invariant to scaling a row, κ is not: a channel that BN scales
    to almost 0 makes κ huge without changing any channel's relative quantization error.
    """
    from specquant.core import spectral
    from specquant.engine.walk import fold_batchnorm, forward_order

    m = copy.deepcopy(model).eval()
    x = calib[:8]
    fold_batchnorm(m, x)
    mods = dict(m.named_modules())
    out = {}
    for n in forward_order(m, x):
        w = spectral.as_matrix(mods[n].weight.detach()).double()
        norms = w.norm(dim=1)
        keep = norms > norms.max() * 1e-12
        out[n] = spectral.condition_number(w[keep] / norms[keep, None]) if keep.any() else math.inf
    return out


def format_corr(model_id: str, method: str, corr: dict, n: int) -> str:
    lines = [f"[{model_id}] Spearman rank correlation with the measured sensitivity ({method}; {n} layers"
             + ("; 3 points: no evidence either way" if n <= 3 else "") + ")"]
    bs = list(corr)
    lines.append(f"{'statistic':<18}" + "".join(f"{'b=' + b + ' rho':>12}{'p':>8}" for b in bs))
    for s in STATS:
        row = f"{s:<18}"
        for b in bs:
            c = corr[b][s]
            row += f"{'-':>12}{'-':>8}" if c["rho"] is None else f"{c['rho']:>12.2f}{c['p']:>8.3f}"
        lines.append(row)
    return "\n".join(lines)


def format_runs(res: dict) -> str:
    lines = [f"{res['model']}: float {res['float_accuracy']:.2f} %",
             f"{'policy':<22}{'budget':>7}{'avg bits':>9}{'bpw':>7}{'acc %':>8}{'sec':>7}  bits per layer"]
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"{r['policy']:<22}{r['budget']:>7g}  {r['error']}")
            continue
        bits = "".join(str(b) if n not in r.get("row_widths", {}) else "*" for n, b in r["bits"].items())
        lines.append(f"{r['policy']:<22}{r['budget']:>7g}{r['avg_bits']:>9.3f}{r['bits_per_weight']:>7.3f}"
                     f"{r['accuracy']:>8.2f}{r['quant_seconds']:>7.1f}  {bits}")
    g = res["goal"]
    if g["met"] is not None:
        b = g["best_at_2.5"]
        lines.append(f"goal (best policy at 2.5 bits >= uniform 3 bits): {'MET' if g['met'] else 'NOT MET'} "
                     f"({b['policy']} {b['accuracy']:.2f} % vs {g['uniform3_accuracy']:.2f} %)")
    return "\n".join(lines)


def plot(res: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    mid = res["model"]
    files = []
    pl = res["per_layer"]
    methods = list(pl[0]["sensitivity"])
    first = methods[0]
    bs = [b for b in ("2", "3", "4") if b in pl[0]["sensitivity"][first]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    idx = list(range(len(pl)))
    kap = [p["kappa"] if p["kappa"] is not None else float("nan") for p in pl]
    a1.bar(idx, [math.log2(k) for k in kap], color="tab:blue", alpha=0.5, label="log2 kappa")
    a1.set_ylabel("log2 kappa (the note's lock width)")
    a1.set_xticks(idx, [p["name"] for p in pl], rotation=70, fontsize=7)
    a1b = a1.twinx()
    for m in methods:
        for b in bs[:2]:
            a1b.plot(idx, [p["sensitivity"][m][b] for p in pl], marker="o", label=f"{m} b={b}")
    a1b.set_yscale("log")
    a1b.set_ylabel("sensitivity (" + res["sensitivity"][first]["metric"] + ", layer alone)")
    a1b.legend(fontsize=7, loc="upper right")
    a1.set_title(f"{mid}: per-layer kappa (bars) and sensitivity (lines)")
    for b in bs:
        a2.scatter(kap, [p["sensitivity"][first][b] for p in pl], label=f"b={b}")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("kappa (BN-folded weight)")
    a2.set_ylabel(f"sensitivity (layer alone, {first})")
    rho = res["spearman"][first].get("2", {}).get("kappa", {}).get("rho")
    a2.set_title("kappa vs sensitivity" + (f" (Spearman rho at 2 bits {rho:.2f})" if rho is not None else ""))
    a2.legend(fontsize=7)
    fig.tight_layout()
    f = folder / f"{mid}_kappa_sensitivity.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[str, list] = {}
    for r in res["runs"]:
        if "accuracy" in r:
            groups.setdefault(r["policy"], []).append((r["avg_bits"], r["accuracy"]))
    for name, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if name == "uniform" else "s",
                linestyle="-" if name == "uniform" else "--", label=name)
    ax.axhline(res["float_accuracy"], color="gray", linestyle=":", label="float")
    ax.set_xlabel("average code bits per weight")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{mid}: GPFQ, accuracy vs average bits")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    f = folder / f"{mid}_pareto.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20-cifar10", "mnist-mlp"])
    p.add_argument("--quick", action="store_true", help="fewer calibration and test images")
    p.add_argument("--calib", type=int, default=None, help="calibration images (default 512, quick 128)")
    p.add_argument("--sens-calib", type=int, default=None, help="images for sensitivities (default 256, quick 64)")
    p.add_argument("--test", type=int, default=None, help="test images (default all, quick 1000)")
    p.add_argument("--sens-methods", nargs="+", choices=("rtn", "gpfq"), default=["rtn", "gpfq"],
                   help="quantizers that measure per-layer sensitivities (rtn: cheap proxy; gpfq: the same method)")
    p.add_argument("--metric", choices=("output", "loss"), default="output",
                   help="sensitivity metric (loss: cross-entropy increase against the float predictions)")
    p.add_argument("--protect-bits", type=int, default=8)
    p.add_argument("--uniform", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 3.0])
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", choices=("symmetric", "asymmetric"), default="symmetric",
                   help="weight grid of every run: symmetric narrow (2^b − 1 levels) or asymmetric "
                        "(2^b levels, per-channel zero point); default symmetric")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="bench-out/mixed_pareto.json")
    p.add_argument("--plots", default="bench-out/mixed_pareto")
    args = p.parse_args(argv)
    args.symmetric = args.grid == "symmetric"
    args.calib = args.calib or (128 if args.quick else 512)
    args.sens_calib = min(args.sens_calib or (64 if args.quick else 256), args.calib)
    args.test = args.test if args.test is not None else (1000 if args.quick else 0)

    t0 = time.perf_counter()
    results, plots = [], []
    for mid in args.models:
        res = bench_model(mid, args)
        if res is None:
            continue
        results.append(res)
        log(format_runs(res))
        plots += plot(res, Path(args.plots))
    for res in results:
        print(format_runs(res))
        for method, corr in res["spearman"].items():
            print(format_corr(res["model"], method, corr, len(res["per_layer"])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "mixed_pareto",
        "quantizer": GPFQConfig(symmetric=args.symmetric).to_dict(),
        "sens_methods": args.sens_methods, "git": git_state(),
        "settings": {k: v for k, v in vars(args).items()}, "seconds": time.perf_counter() - t0,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")},
        "results": results, "plots": plots,
    }
    out.write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False, default=str))
    print(f"wrote {out} and {len(plots)} plots in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
