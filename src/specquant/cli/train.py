"""``specquant train``: quantization-aware fine-tuning (``specquant.qat``) of a PTQ run folder on the
model's training split, evaluated against the PTQ start and written as a run folder like quantize's."""
from __future__ import annotations

import copy
import datetime
import time
from pathlib import Path

import torch

from specquant.cli.common import (
    UI,
    CLIError,
    EtaProgress,
    check_data_dir,
    command_line,
    emit_json,
    evaluate,
    load_saved_model,
    load_test_set,
    measure_storage,
    peak_rss_mb,
    resolve_device,
    staged_run_folder,
    versions,
)
from specquant.core.spectral import condition_number
from specquant.io.files import read_json
from specquant.models import get_entry, get_model
from specquant.qat import QATConfig, finetune
from specquant.qat.layers import prepare_qat
from specquant.qat.train import check_feature_layers
from specquant.report import run_folder as rf
from specquant.report.run_folder import CONFIG_JSON, METRICS_JSON, MODEL_FILE, RunFolderError, verify_run_folder
from specquant.report.table import format_table

LAYER_TABLE = (("name", "layer"), ("bits", "bits"), ("levels", "levels"), ("grid", "grid"),
               ("codes_changed", "codes changed"), ("kappa", "kappa"))


def _read_run(folder: Path, model: str) -> tuple[dict, dict]:
    """config.json and metrics.json of the PTQ run folder, checked to belong together and to ``model``."""
    if not folder.is_dir():
        raise CLIError(f"--from {str(folder)!r} is not a run folder (write one with "
                       "'specquant quantize ... --out DIR')")
    if not (folder / MODEL_FILE).is_file():
        raise CLIError(f"--from {str(folder)!r} holds no {MODEL_FILE}")
    try:
        verify_run_folder(folder)
        config, metrics = read_json(folder / CONFIG_JSON), read_json(folder / METRICS_JSON)
    except RunFolderError as e:
        raise CLIError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CLIError(f"--from {str(folder)!r}: cannot read its config.json / metrics.json ({e})") from None
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise CLIError(f"--from {str(folder)!r}: config.json and metrics.json must hold JSON objects")
    if config.get("model") != model:
        raise CLIError(f"--from {str(folder)!r} is a run of {config.get('model')!r}, not {model!r}")
    if config.get("command") not in ("quantize", "train"):
        raise CLIError(f"--from {str(folder)!r} is a '{config.get('command')}' run; train starts from a quantize run")
    return config, metrics


def train_config(args) -> QATConfig:
    """The QATConfig of the arguments (one-line errors)."""
    try:
        return QATConfig(batch_size=args.batch_size, optimizer=args.optimizer, weight_decay=args.weight_decay,
                         lsq=args.lsq, kappa_reg=args.kappa_reg, kappa_kind=args.kappa_kind,
                         augment="none" if args.augment == "auto" else args.augment,
                         scale_lr_factor=args.scale_lr_factor, mixup=args.mixup,
                         batch_norm=args.batch_norm, ema=args.ema,
                         distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
                         feature_distill=args.feature_distill, feature_layers=tuple(args.feature_layers))
    except ValueError as e:
        raise CLIError(f"train: {e}") from None


def _teacher(args, entry, student: torch.nn.Module, probe: torch.Tensor):
    """The float teacher of --distill (None without it), checked against the student's inputs and classes."""
    if not args.distill:
        if args.teacher is not None:
            raise CLIError("train: --teacher needs --distill")
        return None
    teacher_id = args.teacher or args.model
    try:
        t_entry = get_entry(teacher_id)
    except ValueError as e:
        raise CLIError(f"train: --teacher: {str(e).splitlines()[0]}") from None
    if t_entry.kind != "classifier":
        raise CLIError(f"train: --teacher {teacher_id!r} is not a classifier (kind {t_entry.kind!r})")
    check_data_dir(t_entry, args.data_dir)
    teacher, _ = get_model(teacher_id, args.data_dir)
    if t_entry.id == entry.id:
        return teacher.eval()
    with torch.no_grad():
        try:
            out = teacher(probe)
        except Exception as e:  # noqa: BLE001 - any failure on the student's inputs is a mismatch
            raise CLIError(f"train: --teacher {teacher_id!r} does not take {entry.id}'s inputs of shape "
                           f"{tuple(probe.shape[1:])}: {str(e).splitlines()[0]}") from None
        want = student(probe).shape
    if out.shape != want:
        raise CLIError(f"train: --teacher {teacher_id!r} gives outputs of shape {tuple(out.shape[1:])}, "
                       f"{entry.id} {tuple(want[1:])}: not the same classes")
    return teacher.eval()


def _layer_rows(model, start: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, mod in model.named_modules():
        qw = getattr(mod, "qweight", None)
        if qw is None or name not in start:
            continue
        changed = float((qw.codes != start[name]).float().mean())
        rows.append({"name": name, "type": type(mod).__name__, "shape": list(qw.shape), "bits": qw.bits,
                     "levels": qw.levels, "grid": qw.spec.kind, "granularity": qw.granularity.label(),
                     "bits_per_weight": qw.bits_per_weight(), "codes_changed": changed,
                     "kappa": condition_number(mod.weight.detach())})
    return rows


def cmd_train(args, argv: list[str]) -> int:
    ui = UI(args.quiet)
    t_total = time.perf_counter()
    config = train_config(args)
    device = resolve_device(args.device)
    run = Path(args.from_run).expanduser()
    run_config, run_metrics = _read_run(run, args.model)
    with staged_run_folder(args.out, args.overwrite) as folder:
        model, entry = load_saved_model(run / MODEL_FILE)
        if entry.kind != "classifier" or entry.train is None:
            raise CLIError(f"train: no labelled training split is known for {entry.id!r} (zoo classifiers only)")
        check_data_dir(entry, args.data_dir)
        limit = args.limit if args.limit is not None else run_config.get("limit")
        seed_test = run_config.get("seed") if isinstance(run_config.get("seed"), int) else 0
        x_test, y_test = load_test_set(entry, args.data_dir, limit, seed_test)
        x_train, y_train = entry.train(args.data_dir)
        if args.augment == "auto" and x_train.dim() == 4:
            config.augment = "crop-flip"  # images: random crops and flips
        if config.augment == "crop-flip" and x_train.dim() != 4:
            raise CLIError(f"train: --augment crop-flip needs images (N, C, H, W); {entry.id}'s inputs have shape "
                           f"{tuple(x_train.shape)}")
        if config.batch_norm:  # refuse before any work: the same checks as finetune's, on a copy
            try:
                prepare_qat(copy.deepcopy(model), lsq=config.lsq, batch_norm=True)
            except ValueError as e:
                raise CLIError(f"train: --batch-norm: {e}") from None
        teacher = _teacher(args, entry, model, x_train[:2])
        if config.feature_distill > 0 and teacher is None:
            raise CLIError("train: --feature-distill needs --distill (the features are the teacher's)")
        if config.feature_distill <= 0 and args.feature_layers:
            raise CLIError("train: --feature-layers needs --feature-distill BETA > 0")
        try:
            check_feature_layers(config, model, teacher)
        except ValueError as e:
            raise CLIError(f"train: {e}") from None
        model.to(device)
        if teacher is not None:
            teacher.to(device)
        ptq_acc = evaluate(model, x_test, y_test, ui, "PTQ eval")
        ui.say(f"PTQ start ({run}): {ptq_acc:.2f} % top-1 on {x_test.shape[0]} test samples; fine-tuning on "
               f"{x_train.shape[0]} training samples for {args.epochs} epochs ({torch.get_num_threads()} threads) ...")
        start = {n: m.to_quantized_weight().codes.clone() for n, m in model.named_modules()
                 if hasattr(m, "to_quantized_weight") and n}
        with EtaProgress(ui, "QAT", "step") as progress:
            result = finetune(model, (x_train, y_train), config, epochs=args.epochs, lr=args.lr, seed=args.seed,
                              progress=progress, teacher=teacher)
        t0 = time.perf_counter()
        acc = evaluate(model, x_test, y_test, ui, "QAT eval")
        eval_s = time.perf_counter() - t0
        layers = _layer_rows(model, start)
        meta = {"model": args.model, "method": f"qat+{run_config.get('method')}", "bits": run_config.get("bits"),
                "seed": args.seed, "from": str(run)}
        model.cpu()
        storage = measure_storage(model, entry, folder, meta)
        metrics = {
            "command": "train", "model": args.model, "method": meta["method"], "bits": run_config.get("bits"),
            "from": str(run), "accuracy": acc, "ptq_accuracy": ptq_acc,
            "float_accuracy": run_metrics.get("float_accuracy"), "accuracy_change_vs_ptq": acc - ptq_acc,
            "n_test": int(x_test.shape[0]), "n_train": result.n_train, "epochs": result.epochs, "steps": result.steps,
            "lr": args.lr, "seed": args.seed, "lsq": config.lsq, "scale_lr_factor": config.scale_lr_factor,
            "kappa_reg": config.kappa_reg, "kappa_kind": config.kappa_kind, "augment": config.augment,
            "mixup": config.mixup, "batch_norm": config.batch_norm, "ema": config.ema, "optimizer": config.optimizer,
            "distill": ({"teacher": args.teacher or args.model, "alpha": config.distill_alpha,
                         "temperature": config.distill_temperature} if teacher is not None else None),
            "feature_distill": ({"beta": config.feature_distill, "layers": list(config.feature_layers)}
                                if config.feature_distill > 0 else None),
            "epoch_feature": result.epoch_feature,
            "batch_size": config.batch_size, "train_seconds": result.train_seconds, "threads": torch.get_num_threads(),
            "epoch_loss": result.epoch_loss, "epoch_train_accuracy": result.epoch_accuracy,
            "epoch_kappa": result.epoch_kappa, "bits_per_weight": storage["bits_per_weight"], "storage": storage,
            "eval_seconds": eval_s, "total_seconds": time.perf_counter() - t_total, "peak_rss_mb": peak_rss_mb(),
            "layers": layers,
        }
        if folder is not None:
            stamp = folder.stamp()
            metrics.update(stamp)
            config_json = {
                **stamp, "command": "train", "command_line": command_line(argv), "argv": argv, "model": args.model,
                "method": meta["method"], "bits": run_config.get("bits"), "from": str(run),
                "from_run_id": run_config.get("run_id"), "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                "limit": limit, "data_dir": args.data_dir, "device": str(device), "qat_config": result.config,
                "versions": versions(), "created": datetime.datetime.now().isoformat(timespec="seconds"),
            }
            head = (f"QAT from {run_config.get('method')} at {run_config.get('bits')} bits: {ptq_acc:.2f} % → "
                    f"{acc:.2f} % top-1 ({acc - ptq_acc:+.2f} points) in {result.epochs} epochs, "
                    f"{result.train_seconds:.0f} s of training")
            rf.write_run_folder(folder.path, config=config_json, metrics=metrics, layers=layers,
                                title=f"specquant: {args.model} · QAT from {run_config.get('method')}",
                                headline=[head], notes=["Trained on the training split only; the test set is used "
                                                        "for the two evaluations (PTQ start and result) only."])
    ui.say("")
    ui.say(format_table(layers, LAYER_TABLE))
    ui.say("")
    ui.say(format_table([metrics], [("model", "model"), ("method", "method"), ("bits", "bits"),
                                    ("ptq_accuracy", "PTQ %"), ("accuracy", "QAT %"), ("epochs", "epochs"),
                                    ("train_seconds", "train s"), ("bits_per_weight", "bits/weight (file)")]))
    if folder is not None:
        ui.say(f"\nrun folder: {folder.target}")
    if args.json:
        emit_json(metrics)
    return 0
