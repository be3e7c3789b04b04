"""Frame ΣΔ quantization against uniform grids (RTN, GPFQ): accuracy versus true bits per weight.

Two parts, every model quantized through the engine (``specquant.quantize``), weights of every
Linear/Conv layer only, accuracy on the full test set:

(a) ``mnist-mlp`` (784-500-300-10) with 1-bit ΣΔ codes (first and second order, harmonic frame,
    step rule "max", one step per neuron): accuracy versus redundancy R = N/d on a coarse grid,
    then a fine grid (step ``--fine-step``) between the last coarse R below the target and the
    first one above it, to find the smallest R that reaches ``--target`` (97.29 %, the figure of
    Czaja & Na 2024 for a 3-layer MNIST MLP with 1-bit coefficients).  Accuracy is not monotone
    in R, so three answers are reported: the smallest coarse-grid R that reaches the target, the
    smallest fine-grid R that does, and the smallest R from which every scanned R does.

(b) accuracy versus true storage on ``mnist-mlp`` and ``resnet20-cifar10``: frame ΣΔ (1- and
    2-bit codes, orders 1 and 2, several R) against RTN (``RTNConfig(bits=b)``: MSE-calibrated
    per-channel steps, data-free like the frame method) and GPFQ (``GPFQConfig(bits=b)``,
    ``--calib`` images from the training split), per-channel narrow symmetric grids.

Storage is reported two ways: ``bpw`` = the report's ``bits_per_weight`` (codes plus one fp16
step per quantized vector, i.e. b·N/d + 16/d for the frame method, b + 16/d for RTN/GPFQ) and
``file bpw`` = 8 × the size of the file written by ``specquant.save(..., scale_dtype="fp16")``
divided by the number of quantized weights.  Where a step is below fp16's range (RTN on a
near-zero BN-folded ResNet channel) the file is written with fp32 steps instead, marked * in
the table and by ``file_scales`` in the JSON.  The file also holds the float32 biases (never
quantized by the engine, for any method; ResNet-20 BatchNorm is folded into float conv biases
first), the zoo id and the header, so it is a little above ``bpw``.  No bias correction.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/frame_vs_uniform.py [--quick] \
        [--models mnist-mlp,resnet20-cifar10] [--out bench-out/frame_vs_uniform.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import specquant as sq
from specquant.algorithms.frame import FrameConfig
from specquant.models.zoo import evaluate, get_model

MODELS = ("mnist-mlp", "resnet20-cifar10")
TARGET = 97.29  # Czaja & Na (2024), 3-layer MNIST MLP, 1-bit frame coefficients

# (a) the redundancy search on mnist-mlp (1-bit codes)
SEARCH_COARSE = (1, 1.5, 2, 3, 4, 6, 8)

# (b) settings per model: frame {bits: redundancies} for each ΣΔ order, and RTN/GPFQ bit widths
FULL = {
    "mnist-mlp": {"frame": {1: (1, 1.5, 2, 3, 4, 6, 8), 2: (1, 1.5, 2, 3, 4)}, "orders": (1, 2),
                  "uniform": (1, 2, 3, 4, 5, 6, 8)},
    "resnet20-cifar10": {"frame": {1: (1, 2, 3, 4, 6, 8), 2: (1, 1.5, 2, 3, 4)}, "orders": (1, 2),
                         "uniform": (1, 2, 3, 4, 6, 8)},
}
QUICK = {
    "mnist-mlp": {"frame": {1: (2, 3, 4, 8), 2: (1, 1.5, 2, 4)}, "orders": (1, 2), "uniform": (2, 3, 4, 8)},
    "resnet20-cifar10": {"frame": {1: (2, 4, 8), 2: (1, 2, 4)}, "orders": (1, 2), "uniform": (2, 4, 8)},
}
BUDGETS = (1, 2, 3, 4, 6, 8)  # bits per weight for the "best at ≤ budget" table
SLACK = 0.15  # bpw over a budget still counted in it (fp16 steps and ceil(R·d) rounding)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runner:
    """Quantizes fresh copies of one zoo model and measures accuracy and storage (memoized)."""

    def __init__(self, model_id: str, data_dir, n_calib: int, seed: int, file_size: bool):
        self.model_id = model_id
        self.model, self.entry = get_model(model_id, data_dir)
        self.x, self.y = self.entry.test(data_dir)
        self.example = self.x[:8]
        self.calib = None
        self.data_dir, self.n_calib, self.seed, self.file_size = data_dir, n_calib, seed, file_size
        t = time.perf_counter()
        self.float_accuracy = evaluate(self.model, self.x, self.y)
        self.eval_seconds = time.perf_counter() - t
        self.cache: dict[tuple, dict] = {}
        _log(f"[{model_id}] float {self.float_accuracy:.2f} % on {self.x.shape[0]} test images "
             f"(eval {self.eval_seconds:.1f} s)")

    def run(self, method: str, bits: int, redundancy: float | None = None, order: int | None = None) -> dict:
        key = (method, bits, redundancy, order)
        if key in self.cache:
            return self.cache[key]
        m = copy.deepcopy(self.model)
        calib = None
        if method == "frame":
            cfg = FrameConfig(bits=bits, redundancy=float(redundancy), order=order, seed=self.seed)
        elif method == "rtn":
            cfg = sq.RTNConfig(bits=bits, seed=self.seed)
        elif method == "gpfq":
            cfg = sq.GPFQConfig(bits=bits, seed=self.seed)
            if self.calib is None:
                self.calib = self.entry.calib(self.n_calib, seed=self.seed, data_dir=self.data_dir)
            calib = self.calib
        else:
            raise ValueError(method)
        t0 = time.perf_counter()
        rep = sq.quantize(m, cfg, calib, example_input=self.example, progress=False)
        t1 = time.perf_counter()
        acc = evaluate(m, self.x, self.y)
        t2 = time.perf_counter()
        file_bpw = file_scales = None
        if self.file_size:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.sq"
                try:
                    sq.save(m, path, model_id=self.model_id, scale_dtype="fp16")
                    file_scales = "fp16"
                except ValueError as e:  # a step under fp16's range (e.g. a near-zero folded channel)
                    if "fp16" not in str(e):
                        raise
                    sq.save(m, path, model_id=self.model_id, scale_dtype="fp32")
                    file_scales = "fp32"
                file_bpw = 8 * os.path.getsize(path) / rep.num_weights
        row = {
            "model": self.model_id, "method": method, "bits": bits, "redundancy": redundancy, "order": order,
            "accuracy": acc, "float_accuracy": self.float_accuracy,
            "bits_per_weight": rep.bits_per_weight, "file_bits_per_weight": file_bpw, "file_scales": file_scales,
            "num_weights": rep.num_weights, "n_calib": rep.n_calib,
            "quant_seconds": t1 - t0, "eval_seconds": t2 - t1,
        }
        self.cache[key] = row
        _log(f"[{self.model_id}] {label(row):<22} {acc:6.2f} %  {rep.bits_per_weight:6.3f} bpw"
             f"  ({t1 - t0:.1f} s + eval {t2 - t1:.1f} s)")
        return row


def label(r: dict) -> str:
    if r["method"] == "frame":
        return f"frame ΣΔ{r['order']} b={r['bits']} R={r['redundancy']:g}"
    return f"{r['method'].upper()} b={r['bits']}"


def _fine_grid(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 6) for i in range(1, n)]


def search(runner: Runner, target: float, fine_step: float, orders=(1, 2)) -> dict:
    """Part (a): smallest redundancy with 1-bit codes reaching ``target`` (per ΣΔ order)."""
    out = {}
    for order in orders:
        coarse = [runner.run("frame", 1, float(r), order) for r in SEARCH_COARSE]
        hit = next((r for r in coarse if r["accuracy"] >= target), None)
        fine = []
        if hit is not None and fine_step > 0:
            below = [r for r in coarse if r["redundancy"] < hit["redundancy"]]
            lo = below[-1]["redundancy"] if below else 1.0
            fine = [runner.run("frame", 1, r, order) for r in _fine_grid(lo, hit["redundancy"], fine_step)]
        scanned = sorted(coarse + fine, key=lambda r: r["redundancy"])
        first = next((r for r in scanned if r["accuracy"] >= target), None)
        stable = None  # smallest R from which every scanned R reaches the target
        for i in range(len(scanned)):
            if all(r["accuracy"] >= target for r in scanned[i:]):
                stable = scanned[i]
                break
        out[order] = {"coarse_first": hit, "fine_first": first, "stable_from": stable,
                      "scanned": [{k: r[k] for k in ("redundancy", "accuracy", "bits_per_weight",
                                                     "file_bits_per_weight")} for r in scanned]}
    return out


def print_search(res: dict, target: float, float_acc: float) -> None:
    print(f"\n(a) mnist-mlp, 1-bit ΣΔ codes, harmonic frame, step 'max': smallest R reaching {target} % "
          f"(float {float_acc:.2f} %)")
    for order, s in res.items():
        print(f"  order {order}: " + "  ".join(f"R={r['redundancy']:g}:{r['accuracy']:.2f}" for r in s["scanned"]))
        for what, key in (("first on the coarse grid", "coarse_first"), ("first on the fine grid", "fine_first"),
                          ("reached at every scanned R from", "stable_from")):
            r = s[key]
            if r is None:
                print(f"    {what}: not reached")
            else:
                fb = f", file {r['file_bits_per_weight']:.3f}" if r["file_bits_per_weight"] else ""
                print(f"    {what}: R = {r['redundancy']:g}  acc {r['accuracy']:.2f} %  "
                      f"{r['bits_per_weight']:.3f} bits/weight{fb}")


def nearest(rows: list[dict], bpw: float) -> dict | None:
    """The row with the nearest report bpw (ties: the cheaper one)."""
    return min(rows, key=lambda r: (abs(r["bits_per_weight"] - bpw), r["bits_per_weight"]), default=None)


def matched(rows: list[dict]) -> list[dict]:
    """For each frame setting, the RTN and GPFQ runs of nearest storage."""
    rtn = [r for r in rows if r["method"] == "rtn"]
    gpfq = [r for r in rows if r["method"] == "gpfq"]
    out = []
    for f in (r for r in rows if r["method"] == "frame"):
        nr, ng = nearest(rtn, f["bits_per_weight"]), nearest(gpfq, f["bits_per_weight"])
        out.append({"frame": label(f), "bits_per_weight": f["bits_per_weight"], "accuracy": f["accuracy"],
                    "rtn": None if nr is None else {"bits": nr["bits"], "bits_per_weight": nr["bits_per_weight"],
                                                    "accuracy": nr["accuracy"]},
                    "gpfq": None if ng is None else {"bits": ng["bits"], "bits_per_weight": ng["bits_per_weight"],
                                                     "accuracy": ng["accuracy"]}})
    return out


def budgets(rows: list[dict]) -> list[dict]:
    """Best accuracy of each family at ≤ budget (+SLACK) bits per weight."""
    out = []
    for b in BUDGETS:
        rec = {"budget": b}
        for fam in ("frame", "rtn", "gpfq"):
            ok = [r for r in rows if r["method"] == fam and r["bits_per_weight"] <= b + SLACK]
            best = max(ok, key=lambda r: r["accuracy"], default=None)
            rec[fam] = None if best is None else {"setting": label(best), "accuracy": best["accuracy"],
                                                  "bits_per_weight": best["bits_per_weight"]}
        out.append(rec)
    return out


def print_model(model_id: str, float_acc: float, rows: list[dict], n_calib: int) -> None:
    print(f"\n(b) {model_id}: accuracy versus true bits per weight (float {float_acc:.2f} %; GPFQ with "
          f"{n_calib} calibration images; biases float)")
    print(f"  {'method':<24} {'bpw':>7} {'file bpw':>9} {'acc %':>7} {'Δ float':>8} {'quant s':>8}")
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["method"], r["order"] or 0)):
        fb = f"{r['file_bits_per_weight']:9.3f}" if r["file_bits_per_weight"] else f"{'-':>9}"
        fb += "*" if r.get("file_scales") == "fp32" else " "
        print(f"  {label(r):<24} {r['bits_per_weight']:7.3f} {fb} {r['accuracy']:7.2f} "
              f"{r['accuracy'] - float_acc:8.2f} {r['quant_seconds']:8.1f}")
    if any(r.get("file_scales") == "fp32" for r in rows):
        print("  * steps below fp16's range: file written with fp32 steps (the report's bpw counts fp16)")
    print("  frame against the uniform run of nearest storage (acc %, Δ = frame − other):")
    print(f"  {'frame setting':<24} {'bpw':>6} {'acc':>6} | {'RTN':>5} {'bpw':>6} {'acc':>6} {'Δ':>6} | "
          f"{'GPFQ':>5} {'bpw':>6} {'acc':>6} {'Δ':>6}")
    for m in matched(rows):
        cells = []
        for fam in ("rtn", "gpfq"):
            o = m[fam]
            cells.append(f"{'-':>5} {'':>6} {'':>6} {'':>6}" if o is None else
                         f"{'b=' + str(o['bits']):>5} {o['bits_per_weight']:6.2f} {o['accuracy']:6.2f} "
                         f"{m['accuracy'] - o['accuracy']:6.2f}")
        print(f"  {m['frame']:<24} {m['bits_per_weight']:6.2f} {m['accuracy']:6.2f} | {cells[0]} | {cells[1]}")
    print(f"  best accuracy at ≤ budget (+{SLACK}) bits per weight:")
    print(f"  {'budget':>6} | {'frame ΣΔ':<32} | {'RTN':<16} | {'GPFQ':<16}")
    for b in budgets(rows):
        cells = []
        for fam, w in (("frame", 32), ("rtn", 16), ("gpfq", 16)):
            o = b[fam]
            txt = "-" if o is None else (f"{o['accuracy']:6.2f} ({o['setting']})" if fam == "frame"
                                         else f"{o['accuracy']:6.2f} ({o['bits_per_weight']:.2f})")
            cells.append(f"{txt:<{w}}")
        print(f"  {b['budget']:>6} | " + " | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/frame_vs_uniform.json")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help="fewer settings (and a coarser redundancy search)")
    p.add_argument("--calib", type=int, default=512, help="GPFQ calibration images from the training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=TARGET)
    p.add_argument("--fine-step", type=float, default=None,
                   help="step of the fine redundancy scan in part (a) (default 0.05, 0.1 with --quick; 0 = off)")
    p.add_argument("--no-file-size", action="store_true", help="skip writing files to measure the saved size")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; allowed: {', '.join(MODELS)}")
    fine_step = a.fine_step if a.fine_step is not None else (0.1 if a.quick else 0.05)
    plan = QUICK if a.quick else FULL
    t_start = time.perf_counter()
    result = {"benchmark": "frame_vs_uniform", "quick": a.quick, "target": a.target, "n_calib": a.calib,
              "seed": a.seed, "frame": {"kind": "harmonic", "step": "max", "granularity": "channel",
                                        "dim": "input"},
              "storage": "bits_per_weight: codes + fp16 step per quantized vector; file_bits_per_weight: "
                         "saved file (fp16 steps, float32 biases, header) over quantized weights",
              "biases": "float (not quantized) for every method; BatchNorm folded into float conv biases; "
                        "no bias correction",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "models": {}}
    for model_id in models:
        runner = Runner(model_id, a.data_dir, a.calib, a.seed, not a.no_file_size)
        entry = {"float_accuracy": runner.float_accuracy, "test_images": int(runner.x.shape[0])}
        if model_id == "mnist-mlp":
            res = search(runner, a.target, fine_step)
            entry["search"] = {str(k): v for k, v in res.items()}
            print_search(res, a.target, runner.float_accuracy)
        cfg = plan[model_id]
        for order in cfg["orders"]:
            for bits, reds in cfg["frame"].items():
                for r in reds:
                    runner.run("frame", bits, float(r), order)
        for bits in cfg["uniform"]:
            runner.run("rtn", bits)
        for bits in cfg["uniform"]:
            runner.run("gpfq", bits)
        want = {("frame", b, float(r), o) for o in cfg["orders"] for b, rs in cfg["frame"].items() for r in rs}
        want |= {(m, b, None, None) for m in ("rtn", "gpfq") for b in cfg["uniform"]}
        rows = [runner.cache[k] for k in runner.cache if k in want]
        entry["rows"] = rows
        entry["all_runs"] = list(runner.cache.values())
        entry["matched"] = matched(rows)
        entry["budgets"] = budgets(rows)
        result["models"][model_id] = entry
        print_model(model_id, runner.float_accuracy, rows, a.calib)
        sys.stdout.flush()
    result["seconds"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    _log(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
