"""The primer's depth and protection claims, measured on the CIFAR-10 ResNets (issue 17).

Two hypotheses from ../shared/seeds/002 (the primer), measured, not assumed:

1. **Depth** ("Mean Field Theory for Quantization": L_max ∝ N^1.82 for N quantization levels,
   "INT2 (N=4): L_max ~ 4^1.82 ≈ 12 layers").  Weight-only PTQ (RTN, GPFQ; per output channel;
   calibration images from the training split, seeded), then the *prefix models*: the first k
   quantizable layers in forward order quantized, the rest float, k = 0..L
   (``engine.prefix.prefix_model``; one sequential run holds every prefix, since layer j's
   result depends only on the layers before it — ``tests/engine/test_prefix.py`` checks this).
   Prefixes are scored on a fixed seeded subset of the test set (``--prefix-images``), the full
   models on all test images.  Usable depth at a threshold t: the largest k such that every
   prefix j ≤ k loses less than t points against float on that subset (``usable_depth``; the
   largest k anywhere under t is reported too).  A depth of L means "every layer": censored, it
   says only that L_max ≥ L.  The exponent is fitted by least squares on log depth against
   log N over the uncensored, non-zero points and compared to 1.82.
   Levels N → grid: 2^b − 1 levels is the narrow symmetric b-bit grid (3 = ternary), 2^b the
   asymmetric b-bit grid (4 = 2 bits, 8 = 3 bits), 2 the binary grid.

2. **Protection** ("Layer-Selective Protection": keeping the first and last layers at higher
   precision is "required for disparity < 1.0").  Each model at 2 bits with and without the first
   conv and the last linear at 8 bits; overall accuracy, per-class drop against float and
   disparity = worst class's drop / mean drop (``eval.classify``) on all test images.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/depth_protection.py --out bench-out/depth_protection.json
    python benchmarks/depth_protection.py --models resnet20-cifar10 --methods rtn --levels 4 \
        --prefix-images 500 --limit 1000
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import specquant as sq
from specquant.algorithms import ModuleSettings
from specquant.engine.prefix import prefix_model
from specquant.engine.walk import fold_batchnorm
from specquant.eval.classify import bootstrap_disparity, class_drop, per_class_accuracy
from specquant.io.files import read_json, write_json
from specquant.models import get_entry

PRIMER_EXPONENT = 1.82  # L_max ∝ N^1.82 (the primer; its examples take the constant as 1)


def grid_for_levels(n: int) -> tuple[int, bool]:
    """(bits, symmetric) of the grid with ``n`` levels: 2 binary, 2^b − 1 narrow symmetric, 2^b asymmetric."""
    if n == 2:
        return 1, True
    for b in range(2, 9):
        if n == 2 ** b - 1:
            return b, True
        if n == 2 ** b:
            return b, False
    raise ValueError(f"--levels {n}: no grid has {n} levels (use 2, 2^b − 1 or 2^b with b in 2..8)")


def config_for(method: str, levels: int, seed: int, modules: dict | None = None):
    bits, symmetric = grid_for_levels(levels)
    cls = sq.RTNConfig if method == "rtn" else sq.GPFQConfig
    return cls(bits=bits, symmetric=symmetric, seed=seed, modules=modules or {})


def predict(model, x, batch: int = 500) -> torch.Tensor:
    """Predicted labels (n,) of ``model`` on images ``x``."""
    with torch.inference_mode():
        return torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, x.shape[0], batch)])


def accuracy(model, x, y) -> float:
    return 100.0 * float((predict(model, x) == y).double().mean())


def usable_depth(drops: list[float], threshold: float) -> int:
    """Largest k such that every prefix j ≤ k (drops[j], drops[0] = 0 for the float model) loses less
    than ``threshold`` points."""
    k = 0
    while k + 1 < len(drops) and drops[k + 1] < threshold:
        k += 1
    return k


def fit_exponent(points: list[tuple[int, int]], n_layers: int) -> dict:
    """Least-squares slope of log depth on log N over the points with 0 < depth < n_layers."""
    use = [(n, d) for n, d in points if 0 < d < n_layers]
    out = {"points_used": [list(p) for p in use], "exponent": None}
    if len({n for n, _ in use}) >= 2:
        xs = [math.log(n) for n, _ in use]
        ys = [math.log(d) for _, d in use]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        out["exponent"] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return out


@dataclass
class DepthRow:
    """Prefix accuracies of one (model, method, levels) run."""

    model: str
    method: str  # rtn | gpfq
    levels: int  # N, distinct grid values
    bits: int
    symmetric: bool
    layers: list  # quantized layers in forward order (L of them)
    prefix_accuracy: list  # accuracy % of prefix k = 0..L on the prefix subset
    prefix_drop: list  # float subset accuracy − prefix_accuracy, points
    full_accuracy: float  # fully quantized model (k = L) on the full test set
    usable_depth: dict  # threshold (points, as a string) → largest k with every prefix ≤ k under it
    usable_depth_any: dict  # threshold → largest k under it anywhere
    predicted_depth: float  # N^1.82
    quant_seconds: float
    eval_seconds: float


@dataclass
class ProtectRow:
    """One 2-bit model with or without its first and last layers at 8 bits, on the full test set."""

    model: str
    method: str
    levels: int
    protected: bool  # first conv and last linear at 8 bits
    protected_layers: list
    accuracy: float
    drop: float  # float − accuracy, points
    per_class_accuracy: list
    class_drop: dict  # eval.classify.ClassDrop.to_dict()
    disparity_interval: list | None  # 90 % stratified bootstrap interval of the disparity (200 resamples, seeded)


def run_model(args, model_id: str, result: dict) -> None:
    entry = get_entry(model_id)
    ref = entry.load(args.data_dir).eval()
    x_test, y_test = entry.test(args.data_dir)
    n_cls = int(y_test.max()) + 1
    if args.limit:  # a seeded subset: the test file is sorted by class
        keep = torch.randperm(x_test.shape[0], generator=torch.Generator().manual_seed(args.seed + 1))[:args.limit]
        x_test, y_test = x_test[keep], y_test[keep]
    calib = entry.calib(args.calib, args.seed, args.data_dir)
    fold_batchnorm(ref, calib[:2])  # the reference the prefixes start from: the model as the quantizer sees it
    sub = torch.randperm(x_test.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.prefix_images]
    x_sub, y_sub = x_test[sub], y_test[sub]
    float_pred = predict(ref, x_test)
    float_acc = 100.0 * float((float_pred == y_test).double().mean())
    float_pc = per_class_accuracy(float_pred, y_test, n_cls)
    float_sub = accuracy(ref, x_sub, y_sub)
    info = {"float_accuracy": float_acc, "float_prefix_subset_accuracy": float_sub,
            "float_per_class_accuracy": float_pc.tolist(), "n_test": int(x_test.shape[0]),
            "n_prefix_subset": int(x_sub.shape[0]), "n_calib": int(calib.shape[0])}
    result["models"][model_id] = info
    print(f"{model_id}: float {float_acc:.2f} % ({x_test.shape[0]} test images), {float_sub:.2f} % on the "
          f"{x_sub.shape[0]}-image prefix subset; {calib.shape[0]} calibration images", flush=True)
    full: dict[tuple[str, int], torch.nn.Module] = {}  # (method, levels) → fully quantized model
    names: dict[tuple[str, int], list[str]] = {}  # (method, levels) → its quantized layers, forward order

    def quantized(method: str, levels: int, modules: dict | None = None):
        q = copy.deepcopy(ref)
        t0 = time.perf_counter()
        rep = sq.quantize(q, config_for(method, levels, args.seed, modules), calib=calib, progress=False)
        return q, [r.name for r in rep.layers], time.perf_counter() - t0

    if "depth" in args.parts:
        for method in args.methods:
            for n in args.levels:
                q, layers, qs = quantized(method, n)
                full[(method, n)], names[(method, n)] = q, layers
                t0 = time.perf_counter()
                accs = [accuracy(prefix_model(ref, q, layers, k), x_sub, y_sub) for k in range(len(layers) + 1)]
                drops = [float_sub - a for a in accs]
                row = DepthRow(model_id, method, n, *grid_for_levels(n), layers, accs, drops,
                               accuracy(q, x_test, y_test),
                               {str(t): usable_depth(drops, t) for t in args.thresholds},
                               {str(t): max(k for k, d in enumerate(drops) if d < t) for t in args.thresholds},
                               n ** PRIMER_EXPONENT, qs, time.perf_counter() - t0)
                result["depth"].append(asdict(row))
                print(f"  depth {method:4s} N={n:2d}: full {row.full_accuracy:6.2f} %, usable depth "
                      + ", ".join(f"<{t} pt: {row.usable_depth[str(t)]}/{len(layers)}" for t in args.thresholds)
                      + f" (N^1.82 = {row.predicted_depth:.1f}); prefixes "
                      + " ".join(f"{a:.1f}" for a in accs) + f"  [{qs:.0f} s + {row.eval_seconds:.0f} s]", flush=True)
                _save(args, result)
    if "protection" in args.parts:
        for method in args.methods:
            for n in args.protect_levels:
                if (method, n) not in full:
                    full[(method, n)], names[(method, n)], _ = quantized(method, n)
                layers = names[(method, n)]
                for protected in (False, True):
                    if protected:
                        keep = {layers[0]: ModuleSettings(bits=8), layers[-1]: ModuleSettings(bits=8)}
                        q, _, _ = quantized(method, n, keep)
                    else:
                        q = full[(method, n)]
                    pred = predict(q, x_test)
                    pc = per_class_accuracy(pred, y_test, n_cls)
                    acc = 100.0 * float((pred == y_test).double().mean())
                    cd = class_drop(float_pc, pc)
                    kept = [] if not protected else [layers[0], layers[-1]]
                    ci = bootstrap_disparity(float_pred, pred, y_test, n_cls, reps=200, seed=args.seed)
                    result["protection"].append(asdict(ProtectRow(model_id, method, n, protected, kept, acc,
                                                                  float_acc - acc, pc.tolist(), cd.to_dict(),
                                                                  None if ci is None else list(ci))))
                    dis = "undefined" if cd.disparity is None else f"{cd.disparity:.2f}"
                    print(f"  protect {method:4s} N={n:2d} {'first+last 8 bit' if protected else 'all 2-bit':16s}: "
                          f"{acc:6.2f} %, mean class drop {cd.mean_drop:5.2f}, worst {cd.worst_drop:5.2f} "
                          f"(class {cd.worst_class}), disparity {dis} (90 % interval {_interval(ci)})", flush=True)
                    _save(args, result)


def _interval(ci) -> str:
    return "n/a" if ci is None else f"{ci[0]:.2f}-{ci[1]:.2f}"


def _save(args, result: dict) -> None:
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)


def summarize(result: dict, thresholds: list[float]) -> None:
    """Fitted exponents (into ``result["fits"]``) and the tables."""
    depth = result["depth"]
    fits = []
    for model in result["models"]:
        for method in sorted({r["method"] for r in depth}):
            rows = [r for r in depth if r["model"] == model and r["method"] == method]
            if not rows:
                continue
            n_layers = len(rows[0]["layers"])
            for t in thresholds:
                f = fit_exponent([(r["levels"], r["usable_depth"][str(t)]) for r in rows], n_layers)
                fits.append({"model": model, "method": method, "threshold": t, "layers": n_layers, **f})
    result["fits"] = fits
    if depth:
        print("\n| model | method | N (grid) | full acc % | "
              + " | ".join(f"usable depth, drop < {t}" for t in thresholds) + " | N^1.82 |")
        print("| --- | --- | --- | ---: | " + " | ".join("---:" for _ in thresholds) + " | ---: |")
        for r in depth:
            grid = f"{r['bits']}-bit {'narrow' if r['symmetric'] else 'asym'}"
            L = len(r["layers"])
            print(f"| {r['model']} | {r['method']} | {r['levels']} ({grid}) | {r['full_accuracy']:.2f} | "
                  + " | ".join(f"{r['usable_depth'][str(t)]}/{L}" for t in thresholds)
                  + f" | {r['predicted_depth']:.1f} |")
        print("\n| model | method | threshold | points (N, depth) used | fitted exponent (primer: 1.82) |")
        print("| --- | --- | ---: | --- | --- |")
        for f in fits:
            e = "n/a (< 2 uncensored points)" if f["exponent"] is None else f"{f['exponent']:.2f}"
            print(f"| {f['model']} | {f['method']} | {f['threshold']} | {f['points_used']} | {e} |")
    if result["protection"]:
        print("\n| model | method | N | first+last at 8 bits | accuracy % | mean class drop | worst class drop "
              "(class) | disparity (90 % bootstrap) |")
        print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for r in result["protection"]:
            cd = r["class_drop"]
            dis = "undefined" if cd["disparity"] is None else f"{cd['disparity']:.2f}"
            print(f"| {r['model']} | {r['method']} | {r['levels']} | {'yes' if r['protected'] else 'no'} | "
                  f"{r['accuracy']:.2f} | {cd['mean_drop']:.2f} | {cd['worst_drop']:.2f} ({cd['worst_class']}) | "
                  f"{dis} ({_interval(r.get('disparity_interval'))}) |")


def merge(paths: list[Path]) -> dict:
    """One result from several runs' JSON files (their models, rows and settings side by side)."""
    parts = [read_json(p) for p in paths]
    out = {"seed": [r["seed"] for r in parts], "threads": [r["threads"] for r in parts],
           "thresholds": parts[0]["thresholds"], "primer_exponent": PRIMER_EXPONENT, "models": {}, "depth": [],
           "protection": [], "merged_from": [str(p) for p in paths]}
    for r in parts:
        if r["thresholds"] != out["thresholds"]:
            raise ValueError(f"thresholds differ between the files: {r['thresholds']} and {out['thresholds']}")
        out["models"].update(r["models"])
        out["depth"] += r["depth"]
        out["protection"] += r["protection"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20-cifar10", "resnet32-cifar10"])
    p.add_argument("--methods", nargs="+", default=["rtn", "gpfq"], choices=["rtn", "gpfq"])
    p.add_argument("--levels", nargs="+", type=int, default=[3, 4, 8], help="grid levels N of the depth runs")
    p.add_argument("--protect-levels", nargs="+", type=int, default=[3, 4],
                   help="grid levels of the protection runs (2-bit grids: 3 narrow, 4 asymmetric)")
    p.add_argument("--thresholds", nargs="+", type=float, default=[1.0, 5.0], help="accuracy drops, points")
    p.add_argument("--parts", nargs="+", default=["depth", "protection"], choices=["depth", "protection"])
    p.add_argument("--calib", type=int, default=512, help="calibration images (training split)")
    p.add_argument("--prefix-images", type=int, default=2000, help="seeded test subset the prefixes are scored on")
    p.add_argument("--limit", type=int, default=0, help="test images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (rewritten after every row)")
    p.add_argument("--table", nargs="+", type=Path, default=None,
                   help="merge these JSON files (e.g. one per model), print the tables and fits, and exit")
    args = p.parse_args()
    if args.table:
        merged = merge(args.table)
        summarize(merged, merged["thresholds"])
        _save(args, merged)
        return
    for n in set(args.levels) | set(args.protect_levels):
        grid_for_levels(n)
    torch.manual_seed(args.seed)
    result = {"seed": args.seed, "threads": torch.get_num_threads(), "thresholds": args.thresholds,
              "primer_exponent": PRIMER_EXPONENT, "models": {}, "depth": [], "protection": []}
    t0 = time.perf_counter()
    for model_id in args.models:
        run_model(args, model_id, result)
    summarize(result, args.thresholds)
    result["seconds"] = time.perf_counter() - t0
    _save(args, result)
    if args.out is not None:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
