"""Activation PTQ on a CIFAR-10 ResNet: weights (RTN, GPFQ) and static per-tensor input quantizers.

Every conv and linear layer quantized (per-output-channel narrow symmetric weights), every one of
them also quantizing its input (per-tensor asymmetric, ``QuantConfig.act_bits``) with the range
chosen by each calibrator of ``core.clipping`` on the calibration images (training split,
seeded); accuracy on the CIFAR-10 test images (all 10,000 unless --limit).  Float and
weight-only accuracies are measured in the same run.

For each run the script also measures, on the inputs of every quantized layer for the first 500
test images, the relative activation quantization error ‖Q(x) − x‖² / ‖x‖² (summed over layers)
and what ACIQ's Laplace model (Banner et al. 2019, "Post training 4-bit quantization of
convolutional networks for rapid-deployment") predicts for it: with μ and b = E|x − μ| fitted
per layer and the quantizer's range [lo, hi] and step Δ, E ≈ Δ²/12 + b²·e^{−(hi − μ)/b} +
b²·e^{−(μ − lo)/b}.  The calibrator ranking by that prediction is printed next to the ranking
by accuracy, with the median over layers of each quantizer's range top over ACIQ-Laplace's analytic
one on the same inputs (clip/ACIQ: > 1 means the calibrator keeps a wider range than ACIQ predicts).

``--grids`` / ``--act-grids`` add FP8 weight / activation grids (E4M3, E5M2; 8-bit settings only) beside
the integer ones (ACIQ's columns are left empty for FP8 activations: its model is of a uniform grid).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/act_ptq.py --out bench-out/act_ptq.json
    python benchmarks/act_ptq.py --settings W8A8 --grids int fp8-e4m3 fp8-e5m2 --act-grids int fp8-e4m3 \
        --calibrators mse
    python benchmarks/act_ptq.py --settings W4A4 --weights gpfq --calibrators mse kl --limit 2000
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
from specquant.core.actquant import calibrate_activation, sample_values
from specquant.engine.walk import fold_batchnorm
from specquant.io.files import write_json
from specquant.models import get_entry

CALIBRATORS = ("minmax", "percentile", "mse", "kl", "aciq-gauss", "aciq-laplace")
SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


@dataclass
class Row:
    """One quantized model."""

    weights: str  # rtn | gpfq
    setting: str  # W8A8 | W4A8 | W4A4 | W8 | W4 (weight-only)
    w_bits: int
    act_bits: int | None
    calibrator: str | None
    accuracy: float  # top-1 %
    drop: float  # float accuracy − accuracy, points
    act_rel_mse: float | None  # Σ over layers of ‖Q(x) − x‖²/‖x‖² on test inputs
    aciq_predicted_rel_mse: float | None  # the same from ACIQ's Laplace model
    quant_seconds: float
    clip_vs_aciq: float | None = None  # median over layers of (range top) / (ACIQ-Laplace's analytic range top)
    grid: str = "int"  # weight grid (int | fp8-e4m3 | fp8-e5m2)
    act_grid: str = "int"  # activation grid


def config_for(weights: str, w_bits: int, act_bits: int | None, calibrator: str | None, seed: int,
               grid: str = "int", act_grid: str = "int"):
    act = {} if act_bits is None else {"act_bits": act_bits, "act_calibrator": calibrator, "act_grid": act_grid}
    if weights == "rtn":
        return sq.RTNConfig(bits=w_bits, seed=seed, grid=grid, **act)
    return sq.GPFQConfig(bits=w_bits, seed=seed, grid=grid, **act)


def accuracy(model, x, y, batch: int = 500) -> float:
    correct = 0
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch):
            correct += int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return 100.0 * correct / x.shape[0]


def act_errors(model, x) -> tuple[float, float, float]:
    """(measured, ACIQ-predicted) Σ_layers ‖Q(x) − x‖²/‖x‖² on the raw inputs of the quantized layers, and
    the median over layers of the quantizer's range top over ACIQ-Laplace's analytic one on the same inputs."""
    mods = [(n, m) for n, m in model.named_modules() if getattr(m, "act_quant", None) is not None]
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach()), prepend=True)
               for n, m in mods]  # prepend: the input before the layer's own quantizer
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    measured = predicted = 0.0
    ratios = []
    for n, m in mods:
        v = seen[n].double().reshape(-1)  # (numel,)
        aq = m.act_quant
        energy = float(v.pow(2).mean())
        measured += float((aq.fake_quantize(v) - v).pow(2).mean()) / energy
        if aq.grid != "int":
            continue  # ACIQ's model (uniform steps Δ²/12) does not describe an FP8 grid
        lo, hi = (float(t) for t in aq.spec.value_range(torch.tensor(aq.scale), torch.tensor(float(aq.zero_point))))
        predicted += (aq.scale ** 2 / 12 + _laplace_tail(v, hi) + _laplace_tail(-v, -lo)) / energy
        ref = calibrate_activation(sample_values([v], seed=0), aq.bits, "aciq-laplace", grid=aq.grid)
        ratios.append(hi / float(ref.spec.value_range(torch.tensor(ref.scale), torch.tensor(float(ref.zero_point)))[1]))
    if not ratios:
        return measured, None, None
    return measured, predicted, sorted(ratios)[len(ratios) // 2]


def _laplace_tail(v: torch.Tensor, c: float) -> float:
    """ACIQ's clipping error above ``c`` for a Laplace fitted to the side of ``v`` above its mean:
    p·2b²·e^{−(c − μ)/b}, p the share of values above μ and b their mean distance to μ; 0 when no
    value exceeds ``c`` (a ReLU output has no tail below its range's lower end 0)."""
    if float(v.max()) <= c:
        return 0.0
    mu = float(v.mean())
    up = v[v > mu] - mu  # (n_up,)
    p, b = up.numel() / v.numel(), max(float(up.mean()), 1e-12)
    return p * 2 * b * b * math.exp(-max(c - mu, 0.0) / b)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    entry = get_entry(args.model)
    model = entry.load(args.data_dir).eval()
    x_test, y_test = entry.test(args.data_dir)
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    calib = entry.calib(args.calib, args.seed, args.data_dir)
    fold_batchnorm(model, calib[:2])  # the engine folds too; done once here so every copy starts equal
    float_acc = accuracy(model, x_test, y_test)
    print(f"float: {float_acc:.2f} %  ({x_test.shape[0]} test images, {calib.shape[0]} calibration images)",
          flush=True)
    rows: list[Row] = []

    def one(weights, setting, w_bits, act_bits, cal, grid="int", act_grid="int"):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        sq.quantize(m, config_for(weights, w_bits, act_bits, cal, args.seed, grid, act_grid), calib=calib,
                    progress=False)
        qs = time.perf_counter() - t0
        acc = accuracy(m, x_test, y_test)
        meas, pred, clip = act_errors(m, x_test[:500]) if act_bits is not None else (None, None, None)
        r = Row(weights, setting, w_bits, act_bits, cal, acc, float_acc - acc, meas, pred, qs, clip, grid,
                act_grid if act_bits is not None else "int")
        rows.append(r)
        print(f"{weights:5s} {setting:5s} w:{grid:8s} a:{r.act_grid:8s} {cal or '-':13s} {acc:6.2f} %  "
              f"drop {r.drop:5.2f}  act mse {meas if meas is not None else float('nan'):.4g} (ACIQ model "
              f"{pred if pred is not None else float('nan'):.4g}, clip/ACIQ's {clip or float('nan'):.3g})  "
              f"{qs:.1f} s", flush=True)

    for weights in args.weights:
        for grid in args.grids:
            wbs = sorted({SETTINGS[s][0] for s in args.settings}, reverse=True) if args.weight_only else ()
            for wb in wbs:
                if grid == "int" or wb == 8:  # an FP8 grid is 8-bit
                    one(weights, f"W{wb}", wb, None, None, grid)
            for s in args.settings:
                wb, ab = SETTINGS[s]
                for act_grid in args.act_grids:
                    if (grid != "int" and wb != 8) or (act_grid != "int" and ab != 8):
                        continue
                    for cal in args.calibrators:
                        one(weights, s, wb, ab, cal, grid, act_grid)
    return {"model": args.model, "float_accuracy": float_acc, "n_test": int(x_test.shape[0]),
            "n_calib": int(calib.shape[0]), "seed": args.seed, "threads": torch.get_num_threads(),
            "rows": [asdict(r) for r in rows], "winners": winners(rows)}


def winners(rows: list[Row]) -> list[dict]:
    """Per (weights, setting): the best calibrator by accuracy, and the rankings by accuracy and by
    ACIQ's predicted activation error."""
    out = []
    keys = sorted({(r.weights, r.setting, r.grid, r.act_grid) for r in rows if r.act_bits is not None})
    for w, s, g, ag in keys:
        rs = [r for r in rows if (r.weights, r.setting, r.grid, r.act_grid) == (w, s, g, ag)]
        by_acc = [r.calibrator for r in sorted(rs, key=lambda r: -r.accuracy)]
        by_pred = [r.calibrator for r in sorted(rs, key=lambda r: r.aciq_predicted_rel_mse or 0.0)]
        by_meas = [r.calibrator for r in sorted(rs, key=lambda r: r.act_rel_mse)]
        out.append({"weights": w, "setting": s, "grid": g, "act_grid": ag, "best": by_acc[0],
                    "best_accuracy": max(r.accuracy for r in rs),
                    "ranking_by_accuracy": by_acc, "ranking_by_measured_act_mse": by_meas,
                    "ranking_by_aciq_prediction": by_pred})
    return out


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def speed(args) -> dict:
    """Wall time of the integer W8A8 path (``nn.set_int8_static``) against fp32: a 1024×1024 Linear on
    256 rows, and the whole model on 100 test images (median of 5, after a warm-up)."""
    from specquant.nn import convert, set_int8_static

    torch.manual_seed(args.seed)
    lin = torch.nn.Sequential(torch.nn.Linear(1024, 1024)).eval()
    x = torch.randn(256, 1024)
    entry = get_entry(args.model)
    model = entry.load(args.data_dir).eval()
    calib = entry.calib(args.calib, args.seed, args.data_dir)
    xt = entry.test(args.data_dir)[0][:100]
    out = {}
    cases = (("linear-1024x1024 (256 rows)", lin, x, x), (f"{args.model} (100 images)", model, xt, calib))
    for name, m, inp, cal in cases:
        q = copy.deepcopy(m)
        sq.quantize(q, sq.RTNConfig(bits=8, seed=args.seed, act_bits=8), calib=cal, progress=False)
        q = convert(q, kernel="torch")
        n_int = len(set_int8_static(q))
        with torch.inference_mode():
            t_f = _median_seconds(lambda m=m, inp=inp: m(inp))
            t_i = _median_seconds(lambda q=q, inp=inp: q(inp))
        out[name] = {"fp32_s": t_f, "int8_static_s": t_i, "speedup": t_f / t_i, "integer_layers": n_int}
        print(f"{name}: fp32 {t_f * 1e3:.1f} ms, integer W8A8 {t_i * 1e3:.1f} ms ({t_f / t_i:.2f}x), "
              f"{n_int} integer layers, {torch.get_num_threads()} thread(s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20-cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="test images (0: all)")
    p.add_argument("--weights", nargs="+", default=["rtn", "gpfq"], choices=["rtn", "gpfq"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--calibrators", nargs="*", default=list(CALIBRATORS), choices=CALIBRATORS,
                   help="activation calibrators (none: weight-only rows only)")
    p.add_argument("--grids", nargs="+", default=["int"], choices=["int", "fp8-e4m3", "fp8-e5m2"],
                   help="weight grids (FP8 ones only for 8-bit weights)")
    p.add_argument("--act-grids", nargs="+", default=["int"], choices=["int", "fp8-e4m3", "fp8-e5m2"],
                   help="activation grids (FP8 ones only for 8-bit activations)")
    p.add_argument("--no-weight-only", dest="weight_only", action="store_false",
                   help="skip the weight-only reference rows")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    p.add_argument("--speed", action="store_true", help="only time the integer W8A8 path against fp32")
    args = p.parse_args()
    if args.speed:
        result = {"speed": speed(args), "threads": torch.get_num_threads()}
        if args.out is not None:
            write_json(args.out, result)
        return
    result = run(args)
    print("\n| weights | setting | grid (w/a) | best calibrator | accuracy % | ranking by accuracy | ranking by ACIQ's "
          "model |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for w in result["winners"]:
        print(f"| {w['weights']} | {w['setting']} | {w['grid']}/{w['act_grid']} | {w['best']} | "
              f"{w['best_accuracy']:.2f} | "
              f"{' > '.join(w['ranking_by_accuracy'])} | {' > '.join(w['ranking_by_aciq_prediction'])} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
