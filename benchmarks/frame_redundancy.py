"""Frame ΣΔ quantization: weight reconstruction error versus redundancy on real layers.

For ResNet-20 (all conv layers, read straight from ``resnet20-cifar10.th``) and the MNIST MLP
(``specquant.models.zoo`` ``mnist-mlp`` when it loads, else a random 784×500 Gaussian layer,
labelled as such), quantize every weight row in a harmonic FUNTF with redundancy N/d in
``--redundancies``, with first- and second-order ΣΔ at 1 and 2 bits (step rule "max"), and
report the relative reconstruction error ``sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²)`` over the model's layers,
the true bits per weight, and the log-log slope of error against N (fitted over all
redundancies and over the last three).  Also first order with the paper's step rule "norm"
(δ = ‖v‖₂/(K − ½)), and two references: PCM (each frame coefficient rounded to the nearest
alphabet point, same δ rule: what noise shaping adds) and RTN at the same storage (per-channel,
MSE clipping, ``min(8, round(b·N/d))`` bits: what the same bits buy without frames).  The MLP is
used when its trained weights are already cached (``--train-mlp`` trains it, ~15 s on idle cores).

    .venv/bin/python benchmarks/frame_redundancy.py [--out bench-out/frame_redundancy.json]

Layers with the same row length d share one frame and are quantized together (rows are
independent, so the result is the same as layer by layer, only faster).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from specquant.algorithms.frame import FrameConfig, quantize_weight
from specquant.core.frames import analysis, frame_size, harmonic_frame, synthesis
from specquant.core.quantizer import quantize_tensor
from specquant.core.sigma_delta import decode, stable_input_bound

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"sd1": (1, "max"), "sd2": (2, "max"), "sd1-norm": (1, "norm")}  # ΣΔ order and step rule
NAMES = {"sd1": "ΣΔ 1st", "sd2": "ΣΔ 2nd", "sd1-norm": "ΣΔ 1st norm", "pcm": "PCM", "rtn": "RTN same bpw"}


def data_root(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("SPECQUANT_DATA")
    if env:
        return Path(env)
    return (ROOT / ".." / "shared" / "data").resolve()


def resnet20_convs(root: Path) -> dict[str, torch.Tensor]:
    path = root / "models" / "resnet20-cifar10.th"
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("module."): v.float() for k, v in sd.items() if v.dim() == 4}


def mlp_layers(root: Path, train: bool) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        from specquant.models import zoo
        from specquant.models.zoo import get_model

        cached = getattr(zoo, "mnist_mlp_cache_path", None)
        if not train and cached is not None and not cached().is_file():
            raise RuntimeError("not trained yet; pass --train-mlp to train it (about 15 s on 2 idle cores)")

        model, _ = get_model("mnist-mlp", root)
        layers = {n: m.weight.detach().float() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        if not layers:
            raise RuntimeError("no Linear layers")
        return "mnist-mlp", layers
    except Exception as e:  # no zoo, no data, training failed: a clearly labelled stand-in
        print(f"[frame_redundancy] mnist-mlp unavailable ({type(e).__name__}: {e}); "
              "using a random 784x500 Gaussian layer instead", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        return "random-gaussian-784x500 (stand-in for mnist-mlp)", {
            "fc1": torch.randn(500, 784, generator=g) / math.sqrt(784)}


def group_by_dim(layers: dict[str, torch.Tensor]) -> dict[int, list[tuple[str, torch.Tensor]]]:
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, w in layers.items():
        w2 = w.reshape(w.shape[0], -1)
        groups.setdefault(w2.shape[1], []).append((name, w2))
    return groups


def pcm_reconstruct(W: torch.Tensor, bits: int, redundancy: float) -> torch.Tensor:
    """Round every frame coefficient to the nearest alphabet point (no noise shaping)."""
    d = W.shape[1]
    F = harmonic_frame(d, frame_size(d, redundancy))
    X = analysis(F, W.double().T)  # (N, out)
    K = 1 << (bits - 1)
    delta = (X.abs().amax(0) / stable_input_bound(bits, 1)).clamp_min(1e-300)
    codes = (torch.floor(X / delta) + K).clamp(0, 2 * K - 1)
    return synthesis(F, decode(codes, delta, bits)).T.float()


def evaluate(layers: dict[str, torch.Tensor], method: str, bits: int, redundancy: float) -> dict:
    """Error and storage of one setting over all layers (grouped by row length d)."""
    sq_err = sq_norm = 0.0
    storage = n_weights = 0
    per_layer = {}
    for d, items in group_by_dim(layers).items():
        W = torch.cat([w for _, w in items])  # rows of every layer with this d
        if method == "pcm":
            W_hat = pcm_reconstruct(W, bits, redundancy)
            N = frame_size(d, redundancy)
            store = bits * N * W.shape[0] + 16 * W.shape[0]
        elif method == "rtn":
            b = min(8, max(1, round(bits * frame_size(d, redundancy) / d)))
            q = quantize_tensor(W, bits=b, granularity="channel", clipping="mse")
            W_hat, store = q.dequantize(), q.storage_bits()
        else:
            order, step = METHODS[method]
            q = quantize_weight(W, None, FrameConfig(bits=bits, redundancy=redundancy, order=order, step=step))
            W_hat, store = q.dequantize(), q.storage_bits()
        storage += store
        n_weights += W.numel()
        row = 0
        for name, w in items:
            e = W_hat[row:row + w.shape[0]] - w
            per_layer[name] = float(e.norm() / w.norm())
            sq_err += float(e.pow(2).sum())
            sq_norm += float(w.pow(2).sum())
            row += w.shape[0]
    return {"rel_err": math.sqrt(sq_err / sq_norm), "bits_per_weight": storage / n_weights,
            "per_layer": per_layer}


def slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/frame_redundancy.json")
    p.add_argument("--data-dir", default=None, help="data directory (default $SPECQUANT_DATA or ../shared/data)")
    p.add_argument("--redundancies", default="1,2,4,8,16")
    p.add_argument("--bits", default="1,2")
    p.add_argument("--train-mlp", action="store_true",
                   help="train mnist-mlp into the zoo cache when it is missing (else a random stand-in)")
    args = p.parse_args(argv)
    reds = [float(r) for r in args.redundancies.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    root = data_root(args.data_dir)
    t0 = time.perf_counter()
    models = {"resnet20-cifar10 (conv layers)": resnet20_convs(root)}
    mlp_name, mlp = mlp_layers(root, args.train_mlp)
    models[mlp_name] = mlp

    rows, fits = [], []
    for model, layers in models.items():
        for bits in bits_list:
            for method in NAMES:
                errs = []
                for r in reds:
                    t = time.perf_counter()
                    res = evaluate(layers, method, bits, r)
                    errs.append(res["rel_err"])
                    rows.append({"model": model, "method": method, "bits": bits, "redundancy": r, **res,
                                 "seconds": time.perf_counter() - t})
                if method != "rtn":
                    fits.append({"model": model, "method": method, "bits": bits,
                                 "slope_all": slope(reds, errs),
                                 "slope_last3": slope(reds[-3:], errs[-3:]) if len(reds) >= 3 else None})
    seconds = time.perf_counter() - t0

    print(f"{'model':<34} {'b':>2} {'method':<13} " + " ".join(f"{'R=' + format(r, 'g'):>15}" for r in reds)
          + f" {'slope':>7} {'last3':>7}")
    for model in models:
        for bits in bits_list:
            for method in NAMES:
                sel = [r for r in rows if r["model"] == model and r["bits"] == bits and r["method"] == method]
                cells = " ".join(f"{r['rel_err']:>8.4f}@{r['bits_per_weight']:<6.2f}" for r in sel)
                fit = next((f for f in fits if f["model"] == model and f["bits"] == bits
                            and f["method"] == method), None)
                tail = f" {fit['slope_all']:>7.2f} {fit['slope_last3']:>7.2f}" if fit else ""
                print(f"{model[:34]:<34} {bits:>2} {NAMES[method]:<13} {cells}{tail}")
    print("cells: relative weight error @ true bits per weight (codes + fp16 steps); "
          "slope: log-log fit of error against N = R·d", file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "frame_redundancy",
        "frame": "harmonic", "step": "max", "granularity": "channel", "dim": "input",
        "redundancies": reds, "bits": bits_list,
        "models": {m: {n: list(w.shape) for n, w in layers.items()} for m, layers in models.items()},
        "rows": rows, "slopes": fits, "seconds": seconds, "torch": torch.__version__,
    }, indent=1))
    print(f"wrote {out} ({seconds:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
