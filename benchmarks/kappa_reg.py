"""The κ-regularizer claim of the spectral-limits note, measured: does a lower κ quantize better?

From the same trained float model, fine-tune in float with the loss L_task + λ·Σ_l log κ(W_l)
(``specquant.qat.kappa_penalty``; λ = 0 is the control, trained with the very same batches and
seed), then quantize every copy at 2 and 3 bits by RTN and GPFQ (512 calibration samples of the
training split, seed 0) and measure top-1 on the test set.  Reported per λ: the mean log κ over
the layers, the float accuracy, and each quantized accuracy with its drop from that copy's own
float accuracy (the claim is about the drop).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kappa_reg.py --model digits-mlp --out bench-out/kappa.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import specquant as sq
from specquant.io.files import write_json
from specquant.models import get_entry
from specquant.qat import kappa_penalty

N_CALIB = 512


@dataclass
class Row:
    """One λ, one PTQ method, one width."""

    model: str
    lam: float  # λ of the penalty (0: the control)
    seed: int
    mean_log_kappa: float  # mean over the quantizable layers of log κ(W) after the float fine-tuning
    float_accuracy: float  # top-1 % of this copy in float
    method: str  # rtn | gpfq
    bits: int
    accuracy: float  # top-1 % after PTQ
    drop: float  # float_accuracy − accuracy (points)
    train_seconds: float


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.inference_mode():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def float_finetune(model, x, y, lam: float, epochs: int, lr: float, seed: int, batch: int = 128) -> float:
    """Adam, cosine decay, the task loss plus λ·Σ log κ(W); the same batches for every λ (seeded)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps, total = 0, epochs * -(-x.shape[0] // batch)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)  # (N,)
        for s in range(0, x.shape[0], batch):
            idx = order[s:s + batch]
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * steps / total))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if lam > 0:
                loss = loss + lam * sum(kappa_penalty(m.weight) for m in layers_of(model))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--lams", nargs="+", type=float, default=[0.0, 1e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    p.add_argument("--methods", nargs="+", default=["rtn", "gpfq"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    entry = get_entry(args.model)
    x_train, y_train = entry.train(args.data_dir)
    x_test, y_test = entry.test(args.data_dir)
    base = entry.load(args.data_dir)
    calib = entry.calib(N_CALIB, 0, args.data_dir)
    rows = []
    for seed in args.seeds:
        for lam in args.lams:
            model = copy.deepcopy(base)
            secs = float_finetune(model, x_train, y_train, lam, args.epochs, args.lr, seed)
            with torch.no_grad():
                logk = sum(float(kappa_penalty(m.weight)) for m in layers_of(model)) / len(layers_of(model))
            facc = accuracy(model, x_test, y_test)
            for method in args.methods:
                for bits in args.bits:
                    q = copy.deepcopy(model)
                    cfg = sq.GPFQConfig(bits=bits) if method == "gpfq" else sq.RTNConfig(bits=bits)
                    sq.quantize(q, cfg, calib=calib, progress=False)
                    acc = accuracy(q, x_test, y_test)
                    rows.append(Row(args.model, lam, seed, logk, facc, method, bits, acc, facc - acc, secs))
                    print(f"λ={lam:g} seed {seed}: mean log κ {logk:.3f}, float {facc:.2f} %, {method} W{bits} "
                          f"{acc:.2f} % (drop {facc - acc:.2f})", flush=True)
            if args.out:
                write_json(Path(args.out), {"args": vars(args), "rows": [dataclasses.asdict(r) for r in rows]})
    print("| λ | mean log κ | float % | " + " | ".join(f"{m} W{b} % (drop)" for m in args.methods for b in args.bits)
          + " |")
    print("| --- " * (3 + len(args.methods) * len(args.bits)) + "|")
    for seed in args.seeds:
        for lam in args.lams:
            rs = [r for r in rows if r.lam == lam and r.seed == seed]
            cells = [f"{r.accuracy:.2f} ({r.drop:+.2f})" for m in args.methods for b in args.bits
                     for r in rs if r.method == m and r.bits == b]
            print(f"| {lam:g} | {rs[0].mean_log_kappa:.3f} | {rs[0].float_accuracy:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
