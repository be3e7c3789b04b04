"""Quantization cost against the number of weights: seconds per weight over a 16× range of widths.

One Linear(N0 → width) layer, fixed N0 and calibration set, width doubling from --min-width (512)
to 16× that.  GPFQ, GPTQ and the streaming of statistics cost O(width·N0²) + O(m·N0²), so at
fixed N0 and m seconds per weight should be flat once the width-independent terms (the
statistics, Python overhead per column) are small.  Medians over --repeats.

    python benchmarks/scaling.py --out bench-out/scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import specquant as sq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/scaling.json")
    p.add_argument("--n0", type=int, default=512, help="inputs of the layer (default 512)")
    p.add_argument("--calib", type=int, default=1024, help="calibration rows (default 1024)")
    p.add_argument("--min-width", type=int, default=512, help="narrowest width; the range is 16x (default 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["gpfq", "gptq"])
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(a.calib, a.n0, generator=g))
    widths = [a.min_width * 2**k for k in range(5)]  # 16× range
    records = []
    for method in a.methods:
        make = {"gpfq": sq.GPFQConfig, "gptq": sq.GPTQConfig, "spfq": sq.SPFQConfig, "rtn": sq.RTNConfig}[method]
        for w in widths:
            times = []
            for _ in range(a.repeats):
                torch.manual_seed(1)
                layer = nn.Sequential(nn.Linear(a.n0, w))
                t0 = time.perf_counter()
                sq.quantize(layer, make(bits=3), x, progress=False)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            records.append({"method": method, "width": w, "n0": a.n0, "weights": w * a.n0, "seconds": med,
                            "seconds_per_weight": med / (w * a.n0), "all_seconds": times})
    base = {}
    print(f"{'method':<6} {'width':>6} {'weights':>9} {'seconds':>8} {'ns/weight':>10} {'vs widest':>9}")
    for r in records:
        widest = max((q for q in records if q["method"] == r["method"]), key=lambda q: q["width"])
        base[r["method"]] = widest["seconds_per_weight"]
        r["ratio_to_widest"] = r["seconds_per_weight"] / base[r["method"]]
        print(f"{r['method']:<6} {r['width']:>6} {r['weights']:>9} {r['seconds']:>8.3f} "
              f"{1e9 * r['seconds_per_weight']:>10.1f} {r['ratio_to_widest']:>9.2f}")
    fits = {}
    for m in a.methods:
        rs = [r for r in records if r["method"] == m]
        spw = [r["seconds_per_weight"] for r in rs]
        # Least-squares t = fixed + per_weight · weights: the width-independent part (statistics
        # of the fixed inputs, Python work per input column) against the part that grows.
        n = len(rs)
        mx = sum(r["weights"] for r in rs) / n
        my = sum(r["seconds"] for r in rs) / n
        b = sum((r["weights"] - mx) * (r["seconds"] - my) for r in rs) / sum((r["weights"] - mx) ** 2 for r in rs)
        fits[m] = {"fixed_seconds": my - b * mx, "seconds_per_weight": b,
                   "max_over_min_seconds_per_weight": max(spw) / min(spw)}
        print(f"{m}: max/min seconds per weight over the 16x range = {max(spw) / min(spw):.2f}; "
              f"fit t = {my - b * mx:.3f} s + {1e9 * b:.1f} ns × weights")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump({"records": records, "fits": fits, "n0": a.n0, "calib_rows": a.calib}, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
