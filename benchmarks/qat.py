"""Quantization-aware training from a PTQ start (``specquant.qat.finetune``): does the start matter?

Each case quantizes a zoo model with a PTQ method (512 calibration images of the training split,
seed 0), then fine-tunes the quantized model on the training split (ResNet-20:
``cifar10/train-10k.npz`` with seeded random crops and flips; MNIST MLP: the 60,000 training
images) with the STE and the layer's grid (scales fixed, or learned with --lsq), and measures
top-1 on the test set before and after.  The same budget (epochs, learning rate, seed) for the
GPFQ and the RTN start.  The trained model is saved packed and loaded again: the loaded model's
outputs must equal the trained model's (checked on 500 test images).

``--distill`` trains against the float model's softened outputs as well (knowledge distillation,
Hinton et al. 2015; ``finetune(teacher=...)``: (1 − α)·CE + α·T²·KL, ``--distill-alpha``,
``--distill-temperature``; ``--teacher ID``: another zoo classifier as the teacher); its rows are
marked "+KD".  ``--mixup M`` blends every batch with a shuffled copy of itself (λ ~ Beta(M, M); with
--distill the teacher scores the blended images: "function matching", Beyer et al., CVPR 2022).
``--batch-norm`` trains every quantized convolution with a BatchNorm on its output again (PTQ folded
ResNet's BatchNorms into the convolutions), folded into the per-channel scales at the end ("+BN");
``--ema D`` ends on the moving average of the trained parameters (decay D, "+EMA D").
``--feature-distill β`` (with --distill) adds β times the relative error between the student's and
the teacher's outputs of every residual block (or of ``--feature-layers``) to the loss ("+features").

``--val N`` holds out N training images (seeded) and reports their accuracy too: use it, not the
test set, to choose a learning rate.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/qat.py --cases r20-ternary-gpfq r20-ternary-rtn \\
        --epochs 15 --out bench-out/qat-ternary.json
    python benchmarks/qat.py --table bench-out/qat-*.json
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import specquant as sq
from specquant.algorithms import ModuleSettings
from specquant.engine.walk import quantizable_layers
from specquant.io.files import read_json, write_json
from specquant.models import get_entry
from specquant.qat import QATConfig, finetune

# case -> (zoo id, PTQ method, weight bits, activation bits or None)
CASES = {
    "r20-ternary-gpfq": ("resnet20-cifar10", "gpfq", 2, None),
    "r20-ternary-rtn": ("resnet20-cifar10", "rtn", 2, None),
    "r20-w4a4-gpfq": ("resnet20-cifar10", "gpfq", 4, 4),
    "r20-w4a4-rtn": ("resnet20-cifar10", "rtn", 4, 4),
    "r20-w2a2-gpfq": ("resnet20-cifar10", "gpfq", 2, 2),
    "r20-w2a2-rtn": ("resnet20-cifar10", "rtn", 2, 2),
    "r32-ternary-gpfq": ("resnet32-cifar10", "gpfq", 2, None),
    "r32-ternary-rtn": ("resnet32-cifar10", "rtn", 2, None),
    "mnist-binary-gpfq": ("mnist-mlp", "gpfq", 1, None),
    "mnist-binary-rtn": ("mnist-mlp", "rtn", 1, None),
}
N_CALIB = 512


@dataclass
class Row:
    """One PTQ start and its fine-tuned result."""

    case: str
    model: str
    start: str  # the PTQ method: gpfq | rtn
    w_bits: int
    act_bits: int | None
    levels: int  # grid levels of the weights (3 = ternary, 2 = binary)
    float_accuracy: float  # top-1 %, test set
    ptq_accuracy: float
    qat_accuracy: float
    val_ptq_accuracy: float | None  # on the --val held-out training images
    val_qat_accuracy: float | None
    epochs: int
    lr: float
    lsq: bool
    optimizer: str
    n_train: int
    n_test: int
    epoch_loss: list
    ptq_seconds: float
    train_seconds: float  # training loop only
    threads: int
    seed: int
    saved_equals_trained: bool  # the loaded file's outputs equal the trained model's (500 test images)
    bits_per_weight: float  # the saved file's, headers included
    distill: str | None = None  # "alpha=A,T=T" when trained with the float model as teacher (--distill)
    protected: list | None = None  # layers kept at 8 bits (--protect-first-last), else None
    prefix: int | None = None  # only the first k quantizable layers quantized, the rest float (--prefix)
    n_layers: int | None = None  # quantizable layers of the model
    scale_lr_factor: float = 1.0  # LSQ steps' lr = lr × this (--scale-lr-factor)
    mixup: float = 0.0  # Beta parameter of mixup (--mixup; 0: off)
    batch_norm: bool = False  # convolutions trained with a BatchNorm on their output, folded at the end (--batch-norm)
    ema: float = 0.0  # decay of the moving average of the trained parameters that replaces them at the end (--ema)
    feature_distill: float = 0.0  # β of the feature term (--feature-distill; 0: off)
    feature_layers: list | None = None  # the modules whose outputs were matched (--feature-layers), else None
    epoch_feature: list | None = None  # mean feature term per epoch


def accuracy(model, x, y, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch):
            correct += int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return 100.0 * correct / x.shape[0]


def ptq_config(method: str, bits: int, act_bits: int | None, seed: int, modules: dict | None = None):
    act = {} if act_bits is None else {"act_bits": act_bits, "act_calibrator": "mse"}
    cls = sq.GPFQConfig if method == "gpfq" else sq.RTNConfig
    return cls(bits=bits, seed=seed, modules=modules or {}, **act)


def layer_settings(model, protect: bool, prefix: int | None) -> tuple[dict, list, int]:
    """Per-layer settings for --protect-first-last (first and last quantizable layer at 8 bits) and
    --prefix K (layers K+1… left in float, as ``benchmarks/depth_protection.py``'s prefix models);
    (settings, protected layer names, number of quantizable layers)."""
    names = [n for n, _ in quantizable_layers(model)]  # forward order
    modules, kept = {}, []
    if prefix is not None:
        if not 0 < prefix <= len(names):
            raise SystemExit(f"--prefix must be in 1..{len(names)} for this model, got {prefix}")
        modules.update({n: ModuleSettings(skip=True) for n in names[prefix:]})
    if protect:
        kept = [n for n in (names[0], names[-1]) if n not in modules]
        modules.update({n: ModuleSettings(bits=8) for n in kept})
    return modules, kept, len(names)


def feature_layers(model, args) -> tuple[str, ...]:
    """--feature-layers, or with --feature-distill and none named: every residual block of a CIFAR
    ResNet (``layerS.I``), the units block-output reconstruction works on."""
    if args.feature_layers:
        return tuple(args.feature_layers)
    if args.feature_distill <= 0:
        return ()
    blocks = tuple(n for n, _ in model.named_modules() if re.fullmatch(r"layer\d+\.\d+", n))
    if not blocks:
        raise SystemExit("--feature-distill: this model has no layerS.I residual blocks; name --feature-layers")
    return blocks


def run_case(case: str, args, float_cache: dict) -> Row:
    model_id, method, bits, act_bits = CASES[case]
    entry = get_entry(model_id)
    x_test, y_test = entry.test(args.data_dir)
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    x_train, y_train = entry.train(args.data_dir)
    x_val = y_val = None
    if args.val:
        perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(args.seed))
        x_val, y_val = x_train[perm[:args.val]], y_train[perm[:args.val]]
        x_train, y_train = x_train[perm[args.val:]], y_train[perm[args.val:]]
    model = entry.load(args.data_dir)
    if model_id not in float_cache:
        float_cache[model_id] = accuracy(model, x_test, y_test)
    calib = entry.calib(N_CALIB, args.seed, args.data_dir)
    t0 = time.perf_counter()
    modules, kept, n_layers = layer_settings(model, args.protect_first_last, args.prefix)
    sq.quantize(model, ptq_config(method, bits, act_bits, args.seed, modules), calib=calib, progress=False)
    ptq_s = time.perf_counter() - t0
    ptq_acc = accuracy(model, x_test, y_test)
    val_ptq = accuracy(model, x_val, y_val) if x_val is not None else None
    print(f"{case}: float {float_cache[model_id]:.2f} %, PTQ ({method}) {ptq_acc:.2f} %", flush=True)
    cfg = QATConfig(batch_size=args.batch_size, optimizer=args.optimizer, lsq=args.lsq,
                    augment="crop-flip" if x_train.dim() == 4 else "none",
                    distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
                    scale_lr_factor=args.scale_lr_factor, mixup=args.mixup, batch_norm=args.batch_norm, ema=args.ema,
                    feature_distill=args.feature_distill, feature_layers=feature_layers(model, args))
    teacher = None
    if args.distill:
        teacher = (get_entry(args.teacher) if args.teacher else entry).load(args.data_dir).eval()
    steps = args.epochs * -(-x_train.shape[0] // args.batch_size)
    t_start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % max(1, total // (4 * args.epochs)) == 0 or done == total:
            spent = time.perf_counter() - t_start
            print(f"  {case}: step {done}/{total}, {spent:.0f} s, ETA {spent * (total - done) / done:.0f} s",
                  flush=True)

    lr = args.lr
    result = finetune(model, (x_train, y_train), cfg, epochs=args.epochs, lr=lr, seed=args.seed, progress=progress,
                      teacher=teacher)
    assert result.steps == steps
    qat_acc = accuracy(model, x_test, y_test)
    val_qat = accuracy(model, x_val, y_val) if x_val is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        path = sq.save(model, Path(tmp) / "qat.safetensors", model_id=model_id)
        loaded = sq.load(path, kernel="torch")
        with torch.inference_mode():
            same = torch.equal(loaded(x_test[:500]), model(x_test[:500]))
        bpw = sq.io.storage_breakdown(path)["bits_per_weight"]
    levels = min(m.qweight.levels for m in model.modules() if hasattr(m, "qweight"))  # the low-bit grid
    row = Row(case=case, model=model_id, start=method, w_bits=bits, act_bits=act_bits, levels=levels,
              float_accuracy=float_cache[model_id], ptq_accuracy=ptq_acc, qat_accuracy=qat_acc,
              val_ptq_accuracy=val_ptq, val_qat_accuracy=val_qat, epochs=args.epochs, lr=lr, lsq=args.lsq,
              optimizer=args.optimizer, n_train=int(x_train.shape[0]), n_test=int(x_test.shape[0]),
              epoch_loss=result.epoch_loss, ptq_seconds=ptq_s, train_seconds=result.train_seconds,
              threads=torch.get_num_threads(), seed=args.seed, saved_equals_trained=same, bits_per_weight=bpw,
              distill=(f"alpha={args.distill_alpha},T={args.distill_temperature}"
                       + (f",teacher={args.teacher}" if args.teacher else "")) if args.distill else None,
              protected=kept if args.protect_first_last else None, prefix=args.prefix, n_layers=n_layers,
              scale_lr_factor=args.scale_lr_factor, mixup=args.mixup, batch_norm=args.batch_norm, ema=args.ema,
              feature_distill=args.feature_distill, feature_layers=list(cfg.feature_layers) or None,
              epoch_feature=result.epoch_feature or None)
    print(f"{case}: PTQ {ptq_acc:.2f} % -> QAT {qat_acc:.2f} % ({args.epochs} epochs, {result.train_seconds:.0f} s"
          f" training, {torch.get_num_threads()} thread(s)); saved file equal: {same}", flush=True)
    return row


def held_out(r: dict) -> str:
    if r["val_qat_accuracy"] is None:
        return "—"
    return f"{r['val_ptq_accuracy']:.2f} → {r['val_qat_accuracy']:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| case | start | W/A bits (levels) | float % | PTQ % | QAT % | held-out % (PTQ → QAT) | train images | "
            "epochs | lr | LSQ | train s (threads) | saved = trained |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        a = "float" if r["act_bits"] is None else r["act_bits"]
        kd = f" +KD ({r['distill']})" if r.get("distill") else ""
        if r.get("protected"):
            kd += f" +{'/'.join(r['protected'])} at 8 bits"
        if r.get("lsq") and r.get("scale_lr_factor", 1.0) != 1.0:
            kd += f" (steps' lr × {r['scale_lr_factor']:g})"
        if r.get("mixup"):
            kd += f" +mixup {r['mixup']:g}"
        if r.get("batch_norm"):
            kd += " +BN"
        if r.get("ema"):
            kd += f" +EMA {r['ema']:g}"
        if r.get("feature_distill"):
            kd += f" +features β {r['feature_distill']:g} ({len(r['feature_layers'])} modules)"
        if r.get("prefix") is not None:
            kd += f" (first {r['prefix']} of {r['n_layers']} layers quantized)"
        lines.append(f"| {r['case']}{kd} | {r['start']} | W{r['w_bits']}/A{a} ({r['levels']}) | "
                     f"{r['float_accuracy']:.2f} | "
                     f"{r['ptq_accuracy']:.2f} | **{r['qat_accuracy']:.2f}** | {held_out(r)} | {r['n_train']} | "
                     f"{r['epochs']} | {r['lr']} | "
                     f"{'yes' if r['lsq'] else 'no'} | {r['train_seconds']:.0f} ({r['threads']}) | "
                     f"{'yes' if r['saved_equals_trained'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["r20-ternary-gpfq", "r20-ternary-rtn"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine decay) (default: 1e-4)")
    p.add_argument("--lsq", action="store_true")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-lr-factor", type=float, default=1.0,
                   help="with --lsq: the steps' learning rate is --lr times this (default: 1)")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="mixup with λ ~ Beta(M, M) on every batch (with --distill the teacher scores the blended "
                        "images) (default: 0, off)")
    p.add_argument("--batch-norm", action="store_true",
                   help="train each quantized convolution with a BatchNorm on its output (batch statistics), folded "
                        "into its per-channel scales and bias at the end")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of a moving average of the trained parameters that replaces them at the end "
                        "(e.g. 0.998; default: 0, off)")
    p.add_argument("--distill", action="store_true", help="distil from the float model (teacher) as well")
    p.add_argument("--teacher", default=None,
                   help="with --distill: the zoo classifier to distil from (default: the case's own float model)")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the soft (KL) term (default: 0.5)")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="softening temperature (default: 4)")
    p.add_argument("--feature-distill", type=float, default=0.0,
                   help="with --distill: weight β of the feature term on --feature-layers (default: 0, off)")
    p.add_argument("--feature-layers", nargs="+", default=None,
                   help="modules whose outputs are matched (default with --feature-distill: every residual block)")
    p.add_argument("--protect-first-last", action="store_true",
                   help="keep the first and the last quantizable layer at 8 bits (as ternary papers do)")
    p.add_argument("--prefix", type=int, default=None,
                   help="quantize only the first K quantizable layers (the rest float): a QAT depth point")
    p.add_argument("--val", type=int, default=0, help="hold out this many training images as validation")
    p.add_argument("--limit", type=int, default=0, help="test images (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="JSON file (rewritten whole after each case)")
    p.add_argument("--table", nargs="+", default=None, help="print the markdown table of these JSON files and exit")
    args = p.parse_args()
    if args.table:
        rows = [r for f in args.table for r in read_json(f)["rows"]]
        print(table(rows))
        return
    torch.set_num_threads(args.threads)
    rows, floats = [], {}
    for case in args.cases:
        rows.append(dataclasses.asdict(run_case(case, args, floats)))
        if args.out:
            write_json(Path(args.out), {"args": {k: v for k, v in vars(args).items() if k != "table"}, "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
