"""All methods on the MNIST MLP (784-500-300-10) at 2, 3 and 4 bits, weight-only, per channel.

The network is trained by specquant's own code (cached; see specquant.models.zoo).  The 2-bit
symmetric narrow grid is the ternary alphabet {−δ, 0, δ} of Lybrand & Saab (2021), who report
97.39 % with GPFQ from a 98.24 % float network.

    python benchmarks/mnist_mlp.py --out bench-out/mnist_mlp.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import specquant as sq
from specquant.models.zoo import evaluate, get_model

METHODS = {
    "rtn": lambda b: sq.RTNConfig(bits=b),
    "gpfq": lambda b: sq.GPFQConfig(bits=b),
    "spfq": lambda b: sq.SPFQConfig(bits=b),
    "gptq": lambda b: sq.GPTQConfig(bits=b),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/mnist_mlp.json")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--calib", type=int, default=2048, help="calibration images from MNIST train (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    model, entry = get_model("mnist-mlp", a.data_dir)
    x_test, y_test = entry.test(a.data_dir)
    calib = entry.calib(a.calib, seed=a.seed, data_dir=a.data_dir)
    float_acc = evaluate(model, x_test, y_test)
    records = []
    for bits in a.bits:
        for name, make in METHODS.items():
            m, _ = get_model("mnist-mlp", a.data_dir)
            t0 = time.perf_counter()
            rep = sq.quantize(m, make(bits), calib, progress=False)
            dt = time.perf_counter() - t0
            acc = evaluate(m, x_test, y_test)
            rec = {"method": name, "bits": bits, "levels": rep.layers[0].levels, "accuracy": acc,
                   "float_accuracy": float_acc, "bits_per_weight": rep.bits_per_weight, "quant_seconds": dt,
                   "n_calib": a.calib, "seed": a.seed}
            records.append(rec)
            print(f"{name:<6} W{bits} ({rec['levels']} levels)  {acc:6.2f} %  {dt:6.1f} s", file=sys.stderr, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"\nmnist-mlp, float {float_acc:.2f} %, {a.calib} calibration images")
    print(f"{'method':<6} " + " ".join(f"{'W' + str(b):>8}" for b in a.bits))
    for name in METHODS:
        accs = {r["bits"]: r["accuracy"] for r in records if r["method"] == name}
        print(f"{name:<6} " + " ".join(f"{accs[b]:>8.2f}" for b in a.bits))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("SPECQUANT_THREADS", "2")))
    raise SystemExit(main())
