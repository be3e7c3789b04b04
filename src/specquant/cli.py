"""The ``specquant`` command: ``demo``, ``quantize``, ``eval``, ``analyze``.

Contract (``shared/DESIGN.md``): ``--json`` prints exactly one JSON object on stdout and nothing
else goes to stdout; human tables, status lines and progress bars go to stderr (progress bars only
when stderr is a terminal, never with ``--quiet``). Every error is one line on stderr,
``specquant: error: ...``, with exit status 2 and no traceback (``SPECQUANT_DEBUG=1`` re-raises
unexpected errors with their traceback).

This module only parses arguments and wires the library together: the library itself never
reads command-line arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import logging
import math
import os
import shlex
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specquant.report.run_folder import RunFolder

PROG = "specquant"
METHODS = ("rtn", "gpfq", "spfq", "gptq", "frame")
DEMO_MODEL = "digits-mlp"
DEMO_BITS = (2, 3, 4)
DEMO_REDUNDANCY = 1.5  # frame redundancy N/d used by the demo (true storage ≈ 1.5 × code bits)
POLICIES = ("sensitivity", "spectral", "spectral-knapsack")  # specquant.mixed.POLICIES
FRAME_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)  # redundancies of the frame error-vs-redundancy plot
DEFAULT_CALIB = 512
DEBUG_ENV = "SPECQUANT_DEBUG"

log = logging.getLogger("specquant.cli")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, then printed by ``main``)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sub = self.prog[len(PROG):].strip()
        where = f"{sub}: " if sub else ""
        raise CLIError(f"{where}{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=100)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=98)


def _bits(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 1 to 8, got {text!r}") from None
    if not 1 <= b <= 8:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 1 to 8, got {b}")
    return b


def _avg_bits(text: str) -> float:
    try:
        a = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"average bits must be a number from 1 to 8, got {text!r}") from None
    if not (math.isfinite(a) and 1.0 <= a <= 8.0):
        raise argparse.ArgumentTypeError(f"average bits must be a number from 1 to 8, got {text}")
    return a


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _seed(text: str) -> int:
    try:
        s = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got {text!r}") from None
    if s < 0:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got {s}")
    return s


def _granularity(text: str) -> str:
    if text in ("channel", "tensor"):
        return text
    if text.startswith("group:"):
        try:
            g = int(text[len("group:"):])
        except ValueError:
            g = 0
        if g >= 1:
            return f"group:{g}"
    raise argparse.ArgumentTypeError(f"granularity must be 'channel', 'tensor' or 'group:G' (G >= 1), got {text!r}")


def _redundancy(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        r = float("nan")
    if not (math.isfinite(r) and r >= 1.0):
        raise argparse.ArgumentTypeError(f"redundancy must be a number >= 1, got {text!r}")
    return r


def _frame_default_redundancy() -> float:
    from specquant.algorithms.frame import FrameConfig

    return float(FrameConfig.__dataclass_fields__["redundancy"].default)


def _entry_point(text: str) -> str:
    module, sep, function = text.partition(":")
    if not (sep and all(part.isidentifier() for part in module.split("."))
            and all(part.isidentifier() for part in function.split("."))):
        raise argparse.ArgumentTypeError(f"expected MODULE:FUNCTION (e.g. mypkg.models:build), got {text!r}")
    return text


OUT_HELP = ("the folder is written whole at the end of the run (built under a hidden .NAME.partial-* name "
            "beside it, removed if the run fails); a folder that exists and is not empty is refused unless "
            "--overwrite")
OVERWRITE_HELP = ("let --out replace an existing non-empty folder: the old folder is swapped for the new one only "
                  "once the run has written every file, so a run that fails leaves the old folder as it was "
                  "(default: off, a non-empty --out is refused)")


def _add_common(p: argparse.ArgumentParser, *, json_help: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=json_help + " Human tables still go to stderr. (default: off)")
    p.add_argument("--data-dir", metavar="D", default=None,
                   help="data directory holding mnist/, cifar10/ and models/ (default: $SPECQUANT_DATA, "
                        "else ../shared/data next to the project; digits-mlp needs none)")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing on stderr but errors: no progress bars, status lines or tables "
                        "(default: off; progress bars are also hidden when stderr is not a terminal)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``specquant`` command."""
    from specquant.models import list_models

    models = ", ".join(list_models())
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description=_wrap("specquant: post-training weight quantization of PyTorch networks "
                    "(RTN, GPFQ, SPFQ, GPTQ, frame Sigma-Delta)."),
        epilog=f"zoo models: {models}\nrun 'specquant COMMAND --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    # demo ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo", formatter_class=_Formatter, help="quantize digits-mlp with every method at 2, 3, 4 bits",
        description=_wrap("Train (in about a second) the digits-mlp classifier on scikit-learn's 8x8 digits, "
                    "quantize it with every method (rtn, gpfq, spfq, gptq, frame) at 2, 3 and 4 bits, print "
                    "a table (accuracy, true bits per weight, seconds) and write a run folder with the "
                    "packed models, plots and index.html. Needs no data directory."))
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"run folder to write; {OUT_HELP} (default: ./runs/demo-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--calib", metavar="N", type=_positive_int, default=DEFAULT_CALIB,
                   help=f"calibration samples drawn from the training split (default: {DEFAULT_CALIB})")
    p.add_argument("--seed", metavar="S", type=_seed, default=0,
                   help="seed of the calibration draw and of every random choice (default: 0)")
    p.add_argument("--redundancy", metavar="R", type=_redundancy, default=DEMO_REDUNDANCY,
                   help=f"frame redundancy N/d for the frame method (default: {DEMO_REDUNDANCY}); the true "
                        "storage is about R x the code bits, and the table says so")
    p.add_argument("--json", action="store_true",
                   help="print the demo's metrics as one JSON object on stdout (default: off)")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing on stderr but errors (default: off)")
    p.set_defaults(func=cmd_demo)

    # quantize --------------------------------------------------------------------------------
    p = sub.add_parser(
        "quantize", formatter_class=_Formatter, help="quantize a zoo model and report accuracy and storage",
        description=_wrap("Quantize the weights of a zoo model layer by layer (every Linear/Conv layer, BatchNorm "
                    "folded first), evaluate the float and the quantized model on the test set, and print "
                    "the metrics. With --out, write a run folder: config.json, metrics.json, layers.csv, "
                    "model.safetensors (evaluate it again with 'specquant eval DIR'), plots, index.html."),
        epilog=f"zoo models: {models}\n"
               "example: specquant quantize resnet20-cifar10 --method gpfq --bits 4 --calib 512 --json")
    p.add_argument("model", metavar="MODEL", help=f"zoo id ({models})")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="rtn: round to nearest; gpfq: greedy path following (Lybrand & Saab); spfq: stochastic "
                        "path following (Zhang & Saab); gptq: Frantar et al.; frame: Sigma-Delta over tight "
                        "frames, data-free (Czaja & Na). Required (no default).")
    p.add_argument("--bits", metavar="B", type=_bits, default=None,
                   help="bits per weight code, 1..8 (for frame: per Sigma-Delta code) (default: none; "
                        "required unless --avg-bits is given)")
    p.add_argument("--granularity", metavar="G", type=_granularity, default="channel",
                   help="scale granularity: channel (one per output channel), tensor, or group:G "
                        "(G consecutive inputs per scale) (default: channel)")
    p.add_argument("--calib", metavar="N", type=_positive_int, default=DEFAULT_CALIB,
                   help="calibration samples drawn from the training split with --seed "
                        f"(default: {DEFAULT_CALIB})")
    p.add_argument("--seed", metavar="S", type=_seed, default=0,
                   help="seed of the calibration draw, stochastic rounding and patch sampling (default: 0)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"write a run folder here; {OUT_HELP} (default: none; without it the packed model is "
                        "only written to a temporary file to measure its size)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--redundancy", metavar="R", type=_redundancy, default=None,
                   help=f"frame redundancy N/d >= 1, --method frame only (default: {_frame_default_redundancy()}, "
                        "FrameConfig's)")
    p.add_argument("--avg-bits", metavar="A", type=_avg_bits, default=None,
                   help="mixed precision: average bits per weight over the model, 1..8, with --policy "
                        "(default: none, uniform --bits)")
    p.add_argument("--policy", choices=POLICIES, default=None,
                   help="mixed-precision allocation with --avg-bits: sensitivity (measured per-layer output "
                        "error, budget solved exactly), spectral (the rule ceil(log2 kappa) + b_base fitted to the "
                        "budget) or spectral-knapsack (the rule's error model solved exactly) (default: none)")
    p.add_argument("--per-channel-bits", action="store_true",
                   help="with --policy sensitivity: choose a width per output channel instead of per layer "
                        "(rows of a layer may then differ; each is stored at its own width) (default: per layer)")
    p.add_argument("--limit", metavar="N", type=_positive_int, default=None,
                   help="evaluate on the first N test images only, for quick checks (default: all)")
    _add_common(p, json_help="print the metrics as one JSON object on stdout.")
    p.set_defaults(func=cmd_quantize)

    # eval ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "eval", formatter_class=_Formatter, help="top-1 accuracy of a zoo model, a run folder or a saved file",
        description=_wrap("Evaluate on the test set: a zoo id gives the float model's accuracy; a run folder "
                    "(written by 'specquant quantize --out DIR') or a .safetensors file written by "
                    "specquant.save gives the saved quantized model's accuracy. A run folder is evaluated "
                    "on the same test images as the run (its --limit), and its recorded accuracy is shown "
                    "next to the new one. Its files are checked first: config.json and metrics.json must "
                    "name the same run (run_id) and model.safetensors must have the SHA-256 they record, "
                    "else eval fails; a folder from an older specquant records neither and is evaluated "
                    "with \"verified\": false."))
    p.add_argument("target", metavar="MODEL_OR_DIR_OR_FILE", help=f"zoo id ({models}), run folder or file")
    p.add_argument("--limit", metavar="N", type=_positive_int, default=None,
                   help="evaluate on the first N test images only (default: all, or the run folder's limit)")
    p.add_argument("--allow-entry-point", metavar="MODULE:FUNCTION", action="append", type=_entry_point,
                   default=None,
                   help="loading a file that names this architecture builder (instead of a zoo id) will import "
                        "and call it; only for files you trust; repeat for several (default: off, such files "
                        "are refused)")
    _add_common(p, json_help="print the result as one JSON object on stdout.")
    p.set_defaults(func=cmd_eval)

    # analyze ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "analyze", formatter_class=_Formatter, help="per-layer spectral and statistics table",
        description=_wrap("Per-layer diagnostics of a zoo model: norms, condition number, ranks, weight statistics, "
                    "measured RTN error against the bounds."))
    p.add_argument("model", metavar="MODEL", help=f"zoo id ({models})")
    p.add_argument("--calib", metavar="N", type=_positive_int, default=None,
                   help="also use N calibration samples for the output-error bound (default: none, weights only)")
    p.add_argument("--seed", metavar="S", type=_seed, default=0, help="seed of the calibration draw (default: 0)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"write a run folder here: metrics.json, layers.csv, a κ plot, index.html; {OUT_HELP} "
                        "(default: none)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_common(p, json_help="print the per-layer rows as one JSON object on stdout.")
    p.set_defaults(func=cmd_analyze)
    return parser


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (``resource.getrusage``), None where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


class _UI:
    """Where human output goes: stderr, unless --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = not quiet and sys.stderr.isatty()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, unit: str = "it"):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not self.progress, leave=False)


def evaluate(model, x, y, ui: _UI, desc: str = "eval", batch_size: int = 500) -> float:
    """Top-1 accuracy in percent, with a progress bar over batches."""
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode(), ui.bar(x.shape[0], desc, "img") as bar:
            for s in range(0, x.shape[0], batch_size):
                logits = model(x[s:s + batch_size])
                correct += int((logits.argmax(dim=1) == y[s:s + batch_size]).sum())
                bar.update(min(batch_size, x.shape[0] - s))
    finally:
        model.train(was_training)
    return 100.0 * correct / x.shape[0]


def _check_data_dir(entry, data_dir) -> None:
    """Fail early, before any work, when the model needs the data directory and it is missing."""
    if entry.needs_data_dir:
        from specquant.models.data import data_dir as resolve

        resolve(data_dir)


def _test_set(entry, data_dir, limit: int | None):
    x, y = entry.test(data_dir)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def make_config(method: str, bits: int, granularity: str = "channel", seed: int = 0,
                redundancy: float | None = None):
    """The algorithm config of ``method`` (library defaults for everything not given)."""
    import specquant as sq

    kw = {"bits": bits, "granularity": granularity, "seed": seed}
    if method == "frame":
        from specquant.algorithms.frame import FrameConfig

        if redundancy is not None:
            kw["redundancy"] = redundancy
        return FrameConfig(**kw)
    if redundancy is not None:
        raise CLIError("--redundancy applies to --method frame only")
    cls = {"rtn": sq.RTNConfig, "gpfq": sq.GPFQConfig, "spfq": sq.SPFQConfig, "gptq": sq.GPTQConfig}.get(method)
    if cls is None:
        raise CLIError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return cls(**kw)


def _config_dict(config) -> dict:
    d = dataclasses.asdict(config)
    d["method"] = config.method
    return d


def _io():
    try:
        from specquant import io as sqio
    except ImportError as e:  # pragma: no cover - io lands separately
        raise CLIError(f"saving and loading packed models is not available yet ({e})") from None
    return sqio


def _storage(model, model_id: str, path: Path, meta: dict) -> dict:
    """Save the packed model to ``path`` and return its storage breakdown (file bits per weight)."""
    sqio = _io()
    sqio.save(model, path, model_id=model_id, meta=meta)
    return sqio.storage_breakdown(path)


def _measure_storage(model, model_id: str, folder: RunFolder | None, meta: dict) -> dict:
    """Storage of the packed model: saved as the run folder's model file when there is one (into its
    staging folder), else into a temporary folder that is removed."""
    from specquant.report.run_folder import MODEL_FILE

    if folder is not None:
        return _storage(model, model_id, folder.path / MODEL_FILE, meta)
    with tempfile.TemporaryDirectory(prefix="specquant-") as tmp:
        return _storage(model, model_id, Path(tmp) / MODEL_FILE, meta)


def _payload_bpw(storage: dict) -> float | None:
    n = storage.get("quantized_weights")
    if not n:
        return None
    return (storage["codes_bytes"] + storage["scale_bytes"] + storage["zero_point_bytes"]) * 8 / n


@contextlib.contextmanager
def _run_folder(out: str | None, overwrite: bool) -> Iterator[RunFolder | None]:
    """The run folder of ``--out``, written whole or not at all (``report.run_folder.RunFolder``).

    Checks the target at once (a non-empty folder is refused unless ``--overwrite``), so enter
    it before any long work. Inside the block write into ``folder.path`` (a hidden staging
    folder); a normal exit renames it to the target, an exception or Ctrl-C removes it. Yields
    None without ``--out``.
    """
    if out is None:
        if overwrite:
            raise CLIError("--overwrite needs --out DIR")
        yield None
        return
    from specquant.report.run_folder import RunFolder, RunFolderError

    try:
        folder = RunFolder(out, overwrite=overwrite)
        with folder:
            yield folder
    except RunFolderError as e:
        raise CLIError(str(e)) from None


def _versions() -> dict:
    import platform

    import torch

    import specquant

    return {"specquant": specquant.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _command_line(argv: list[str]) -> str:
    return " ".join([PROG] + [shlex.quote(a) for a in argv])


def _folded_float(model, calib):
    """A float copy with BatchNorm folded as the engine folds it (for κ and the frame sweep)."""
    from specquant.engine.walk import fold_batchnorm

    m = copy.deepcopy(model).eval()
    fold_batchnorm(m, calib[: min(8, calib.shape[0])])
    return m


def _layer_rows(report, kappas: dict) -> list[dict]:
    rows = []
    for r in report.layers:
        d = dataclasses.asdict(r)
        d["kappa"] = kappas.get(r.name)
        rows.append(d)
    return rows


LAYER_TABLE = (("name", "layer"), ("type", "type"), ("shape", "shape"), ("bits", "bits"), ("levels", "levels"),
               ("bits_per_weight", "bits/w"), ("weight_sqnr_db", "SQNR dB"), ("rel_output_error", "rel. out err"),
               ("kappa", "kappa"), ("seconds", "s"))


def _emit_json(obj) -> None:
    from specquant.io.files import dumps

    sys.stdout.write(dumps(obj, indent=None) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------


def _allocate(model, config, calib, avg_bits: float, policy: str, granularity: str = "layer"):
    """Per-layer bits from ``specquant.mixed.allocate`` for an average budget (an ``Allocation``)."""
    try:
        from specquant.mixed import allocate
    except ImportError:
        raise CLIError("--avg-bits/--policy: mixed precision is not available yet "
                       "(specquant.mixed.allocate has not landed)") from None
    return allocate(model, calib, avg_bits, policy=policy, method_config=config, granularity=granularity)


def _quantize_config(args):
    """Every check of ``specquant quantize``'s arguments, before any work; returns the algorithm config."""
    from specquant.models import get_entry

    entry = get_entry(args.model)
    if args.avg_bits is None and args.bits is None:
        raise CLIError("quantize: give --bits B (uniform) or --avg-bits A with --policy (mixed precision)")
    if args.avg_bits is not None and args.policy is None:
        raise CLIError("quantize: --avg-bits needs --policy (sensitivity, spectral or spectral-knapsack)")
    if args.policy is not None and args.avg_bits is None:
        raise CLIError("quantize: --policy needs --avg-bits A")
    if args.avg_bits is not None and args.bits is not None:
        raise CLIError("quantize: give either --bits (uniform) or --avg-bits (mixed precision), not both")
    if args.redundancy is not None and args.method != "frame":
        raise CLIError("quantize: --redundancy applies to --method frame only")
    if args.per_channel_bits and args.policy != "sensitivity":
        raise CLIError("quantize: --per-channel-bits needs --avg-bits A --policy sensitivity")
    if args.per_channel_bits and (args.method == "frame" or args.granularity != "channel"):
        raise CLIError("quantize: --per-channel-bits needs per-channel scales (--granularity channel) and a "
                       "uniform-grid method (rtn, gpfq, spfq, gptq)")
    mixed = args.avg_bits is not None
    base_bits = args.bits if not mixed else max(1, min(8, round(args.avg_bits)))
    config = make_config(args.method, base_bits, args.granularity, args.seed, args.redundancy)
    _check_data_dir(entry, args.data_dir)
    if mixed:  # fail before the long work when the allocator has not landed
        try:
            from specquant.mixed import allocate  # noqa: F401
        except ImportError:
            raise CLIError("--avg-bits/--policy: mixed precision is not available yet "
                           "(specquant.mixed.allocate has not landed)") from None
    return config


def run_quantize(args, argv: list[str], ui: _UI, config, folder: RunFolder | None = None) -> dict:
    """The work of ``specquant quantize`` with the checked ``config`` (see :func:`_quantize_config`);
    returns the metrics. With a ``folder`` (:func:`_run_folder`), writes every file of the run
    folder into its staging folder, ``config.json`` and ``metrics.json`` stamped with its
    ``run_id`` and the model's SHA-256."""
    import specquant as sq
    from specquant.models import get_model

    t_total = time.perf_counter()
    mixed = args.avg_bits is not None
    ui.say(f"loading {args.model} ...")
    model, entry = get_model(args.model, args.data_dir)
    x_test, y_test = _test_set(entry, args.data_dir, args.limit)
    calib = entry.calib(args.calib, args.seed, args.data_dir)
    t0 = time.perf_counter()
    float_acc = evaluate(model, x_test, y_test, ui, "float eval")
    float_eval_s = time.perf_counter() - t0
    ui.say(f"float model: {float_acc:.2f} % top-1 on {x_test.shape[0]} test images")

    allocation = None
    if mixed:
        per = "channel" if args.per_channel_bits else "layer"
        ui.say(f"allocating bits per {per} ({args.policy} policy, {args.avg_bits} bits on average) ...")
        allocation = _allocate(model, config, calib, args.avg_bits, args.policy, per)
        config = allocation.apply(config)
    float_model = _folded_float(model, calib)
    ui.say(f"quantizing with {args.method} "
           + (f"at {args.bits} bits" if not mixed else f"at {args.avg_bits} average bits ({args.policy})")
           + f", {calib.shape[0]} calibration samples ...")
    report = sq.quantize(model, config, calib=calib, progress=ui.progress)
    t0 = time.perf_counter()
    acc = evaluate(model, x_test, y_test, ui, "quantized eval")
    eval_s = time.perf_counter() - t0

    kappas = _layer_kappas(float_model, [r.name for r in report.layers])
    layers = _layer_rows(report, kappas)
    meta = {"model": args.model, "method": args.method, "bits": args.bits, "avg_bits": args.avg_bits,
            "policy": args.policy, "granularity": args.granularity, "calib": args.calib, "seed": args.seed,
            "redundancy": getattr(config, "redundancy", None) if args.method == "frame" else None}
    storage = _measure_storage(model, args.model, folder, meta)

    metrics: dict = {
        "command": "quantize",
        "model": args.model,
        "method": args.method,
        "bits": args.bits,
        "avg_bits": report.avg_bits,
    }
    if mixed:
        metrics.update({"target_avg_bits": args.avg_bits, "policy": args.policy,
                        "allocation": allocation.to_dict()})
    if args.method == "frame":
        metrics["redundancy"] = config.redundancy
    metrics.update({
        "granularity": args.granularity,
        "bits_per_weight": storage["bits_per_weight"],
        "bits_per_weight_payload": _payload_bpw(storage),
        "storage": storage,
        "accuracy": acc,
        "float_accuracy": float_acc,
        "accuracy_drop": float_acc - acc,
        "n_test": int(x_test.shape[0]),
        "n_calib": report.n_calib,
        "num_weights": report.num_weights,
        "seed": args.seed,
        "quant_seconds": report.seconds,
        "eval_seconds": eval_s,
        "float_eval_seconds": float_eval_s,
        "total_seconds": time.perf_counter() - t_total,
        "peak_rss_mb": peak_rss_mb(),
        "skipped": [dataclasses.asdict(s) for s in report.skipped],
        "folded_bn": [dataclasses.asdict(f) for f in report.folded_bn],
        "layers": layers,
    })

    if folder is not None:
        from specquant.report import run_folder as rf

        plots = {"layers.png": rf.plot_layers(
            [r["name"] for r in layers], {args.method: [r["rel_output_error"] for r in layers]},
            [r["kappa"] for r in layers], title=f"{args.model} {args.method}: per-layer relative output error and κ")}
        notes = []
        if args.method == "frame":
            from specquant.diagnostics import sweeps

            sweep = sweeps.frame_redundancy_sweep(float_model, config.bits, FRAME_SWEEP, order=config.order,
                                              frame=config.frame, step=config.step, dim=config.dim,
                                              granularity=config.granularity, seed=config.seed)
            metrics["frame_redundancy"] = sweep
            plots["frame_redundancy.png"] = rf.plot_frame_redundancy([sweep])
            notes.append("frame_redundancy.png: data-free weight error ‖W − Ŵ‖/‖W‖ of the float (BN-folded) "
                         "weights for each redundancy at the run's code width.")
        metrics["peak_rss_mb"] = peak_rss_mb()
        stamp = folder.stamp()  # run_id and model_sha256, in both files
        metrics.update(stamp)
        config_json = {
            **stamp, "command": "quantize", "command_line": _command_line(argv), "argv": argv,
            "model": args.model, "method": args.method, "bits": args.bits, "avg_bits": args.avg_bits,
            "policy": args.policy, "granularity": args.granularity, "calib": args.calib, "seed": args.seed,
            "redundancy": args.redundancy, "limit": args.limit, "data_dir": args.data_dir,
            "quant_config": _config_dict(config), "versions": _versions(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        title = f"specquant: {args.model} · {args.method} · " + (
            f"{args.bits} bits" if not mixed else f"{args.avg_bits} average bits ({args.policy})")
        rf.write_run_folder(folder.path, config=config_json, metrics=metrics, layers=layers, plots=plots,
                            title=title, notes=notes)
    return metrics


def _layer_kappas(model, names):
    from specquant.diagnostics.sweeps import layer_kappas

    return layer_kappas(model, names)


def cmd_quantize(args, argv: list[str]) -> int:
    from specquant.report.table import format_table

    ui = _UI(args.quiet)
    config = _quantize_config(args)
    with _run_folder(args.out, args.overwrite) as folder:
        metrics = run_quantize(args, argv, ui, config, folder)
    out = folder.target if folder is not None else None
    bits = metrics["bits"] if metrics["bits"] is not None else f"avg {metrics['avg_bits']:.3g}"
    ui.say("")
    ui.say(format_table(metrics["layers"], LAYER_TABLE))
    ui.say("")
    ui.say(format_table([dict(metrics, bits=bits)], [
        ("model", "model"), ("method", "method"), ("bits", "bits"), ("bits_per_weight", "bits/weight (file)"),
        ("float_accuracy", "float %"), ("accuracy", "accuracy %"), ("quant_seconds", "quant s"),
        ("peak_rss_mb", "peak RSS MB")]))
    if out is not None:
        ui.say(f"\nrun folder: {out}  (open {out / 'index.html'})")
    if args.json:
        _emit_json(metrics)
    return 0


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def run_demo(args, argv: list[str], ui: _UI, folder: RunFolder, t_total: float) -> tuple[dict, list[dict]]:
    """The work of ``specquant demo``: every file of the run folder written into ``folder.path``
    (the 15 packed models under models/). Returns (metrics, rows of the summary table)."""
    import specquant as sq
    from specquant.diagnostics.sweeps import frame_redundancy_sweep, layer_kappas
    from specquant.models import get_model
    from specquant.report import run_folder as rf

    ui.say(f"training {DEMO_MODEL} on scikit-learn's digits ...")
    model, entry = get_model(DEMO_MODEL)
    x_test, y_test = entry.test(None)
    calib = entry.calib(args.calib, args.seed, None)
    float_acc = evaluate(model, x_test, y_test, ui, "float eval")
    ui.say(f"float model: {float_acc:.2f} % top-1 on {x_test.shape[0]} test images; quantizing with "
           f"{', '.join(METHODS)} at {', '.join(map(str, DEMO_BITS))} bits ...")

    runs, layer_rows = [], []
    float_model = _folded_float(model, calib)
    kappas = None
    with ui.bar(len(METHODS) * len(DEMO_BITS), "demo", "run") as bar:
        for method in METHODS:
            for bits in DEMO_BITS:
                m = copy.deepcopy(model)
                cfg = make_config(method, bits, "channel", args.seed,
                                  args.redundancy if method == "frame" else None)
                report = sq.quantize(m, cfg, calib=calib, progress=False)
                acc = evaluate(m, x_test, y_test, _UI(True))
                if kappas is None:
                    kappas = layer_kappas(float_model, [r.name for r in report.layers])
                name = f"{method}-w{bits}.safetensors"
                meta = {"model": DEMO_MODEL, "method": method, "bits": bits, "calib": args.calib, "seed": args.seed,
                        "redundancy": cfg.redundancy if method == "frame" else None}
                storage = _storage(m, DEMO_MODEL, folder.path / "models" / name, meta)
                layers = _layer_rows(report, kappas)
                runs.append({
                    "model": DEMO_MODEL, "method": method, "bits": bits,
                    "redundancy": cfg.redundancy if method == "frame" else None,
                    "levels": report.layers[0].levels if report.layers else None,
                    "avg_bits": report.avg_bits,
                    "bits_per_weight": storage["bits_per_weight"],
                    "bits_per_weight_payload": _payload_bpw(storage),
                    "accuracy": acc, "float_accuracy": float_acc, "accuracy_drop": float_acc - acc,
                    "seed": args.seed, "n_calib": report.n_calib, "n_test": int(x_test.shape[0]),
                    "file": f"models/{name}", "file_bytes": storage["file_bytes"],
                    "quant_seconds": report.seconds, "peak_rss_mb": peak_rss_mb(), "layers": layers,
                })
                layer_rows.extend({"method": method, "run_bits": bits, **row} for row in layers)
                bar.update(1)

    sweeps = [frame_redundancy_sweep(float_model, b, FRAME_SWEEP) for b in DEMO_BITS]
    names = [r["name"] for r in runs[0]["layers"]]
    mid = DEMO_BITS[len(DEMO_BITS) // 2]
    plots = {
        "accuracy_vs_bits.png": rf.plot_accuracy_vs_bits(runs, float_acc, title=f"{DEMO_MODEL}: accuracy against "
                                                         "true storage"),
        "layers.png": rf.plot_layers(
            names, {r["method"]: [row["rel_output_error"] for row in r["layers"]] for r in runs if r["bits"] == mid},
            [kappas.get(n) for n in names], title=f"{DEMO_MODEL} at {mid} bits: per-layer relative output error "
                                                  "and κ"),
        "frame_redundancy.png": rf.plot_frame_redundancy(sweeps),
    }
    stamp = folder.stamp()  # run_id, in both files
    metrics = {
        **stamp, "command": "demo", "model": DEMO_MODEL, "float_accuracy": float_acc, "seed": args.seed,
        "n_calib": int(calib.shape[0]), "n_test": int(x_test.shape[0]), "methods": list(METHODS),
        "bits": list(DEMO_BITS), "frame_redundancy_setting": args.redundancy,
        "runs": runs, "frame_redundancy": sweeps,
        "total_seconds": time.perf_counter() - t_total, "peak_rss_mb": peak_rss_mb(),
    }
    config_json = {
        **stamp, "command": "demo", "command_line": _command_line(argv), "argv": argv, "model": DEMO_MODEL,
        "methods": list(METHODS), "bits": list(DEMO_BITS), "calib": args.calib, "seed": args.seed,
        "redundancy": args.redundancy, "granularity": "channel",
        "quant_configs": {m: _config_dict(make_config(m, DEMO_BITS[0], "channel", args.seed,
                                                      args.redundancy if m == "frame" else None)) for m in METHODS},
        "versions": _versions(), "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    summary = [{k: v for k, v in r.items() if k != "layers"} for r in runs]
    notes = [
        f"{DEMO_MODEL}: MLP {'-'.join(map(str, entry.extra.get('sizes', [])))} trained on scikit-learn's digits, "
        f"float accuracy {float_acc:.2f} % on {x_test.shape[0]} test images; {calib.shape[0]} calibration samples "
        f"from the training split; per-channel scales.",
        "bits_per_weight is the true storage read from each saved file (codes, scales and headers, per quantized "
        "weight); bits_per_weight_payload leaves the file headers out. On a model this small the headers cost "
        "about one bit per weight.",
        f"frame: data-free Sigma-Delta over a harmonic tight frame with redundancy {args.redundancy}, so it stores "
        f"about {args.redundancy} × the code bits per weight.",
    ]
    metrics["total_seconds"] = time.perf_counter() - t_total
    metrics["peak_rss_mb"] = peak_rss_mb()
    rf.write_run_folder(folder.path, config=config_json, metrics=metrics, layers=layer_rows, plots=plots,
                        summary=summary, title=f"specquant demo: {DEMO_MODEL}, every method at 2, 3 and 4 bits",
                        notes=notes)
    return metrics, summary


def cmd_demo(args, argv: list[str]) -> int:
    from specquant.report.table import format_table

    ui = _UI(args.quiet)
    t_total = time.perf_counter()
    out = args.out or os.path.join("runs", "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    with _run_folder(out, args.overwrite) as folder:
        metrics, summary = run_demo(args, argv, ui, folder, t_total)
    metrics["total_seconds"] = time.perf_counter() - t_total
    out = folder.target

    ui.say("")
    ui.say(format_table(summary, [("method", "method"), ("bits", "bits"), ("accuracy", "accuracy %"),
                                  ("bits_per_weight", "bits/weight (file)"),
                                  ("bits_per_weight_payload", "bits/weight (payload)"),
                                  ("quant_seconds", "seconds")]))
    ui.say(f"\nfloat accuracy {metrics['float_accuracy']:.2f} %; frame uses redundancy {args.redundancy} "
           f"(bits = bits per code). Total {metrics['total_seconds']:.1f} s.")
    ui.say(f"run folder: {out}  (open {out / 'index.html'})")
    if args.json:
        _emit_json(metrics)
    return 0


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def cmd_eval(args, argv: list[str]) -> int:
    from specquant.io.files import read_json
    from specquant.models import get_entry, get_model, list_models
    from specquant.report.run_folder import (
        CONFIG_JSON,
        METRICS_JSON,
        MODEL_FILE,
        RunFolderError,
        verify_run_folder,
    )
    from specquant.report.table import format_table

    ui = _UI(args.quiet)
    target = args.target
    path = Path(target).expanduser()
    folder = run_config = run_metrics = None
    limit = args.limit
    result: dict = {}
    if not path.exists() and target in list_models():
        entry = get_entry(target)
        _check_data_dir(entry, args.data_dir)
        t0 = time.perf_counter()
        model, entry = get_model(target, args.data_dir)
        load_s = time.perf_counter() - t0
        result.update({"model": target, "source": "zoo", "quantized": False})
    else:
        if path.is_dir():
            folder = path
            path = folder / MODEL_FILE
            if not path.is_file():
                raise CLIError(f"{str(folder)!r} holds no {MODEL_FILE} (a run folder of 'specquant quantize --out'"
                               f"; the demo keeps its models under models/)")
            with contextlib.suppress(OSError, ValueError):
                run_config = read_json(folder / CONFIG_JSON)
            with contextlib.suppress(OSError, ValueError):
                run_metrics = read_json(folder / METRICS_JSON)
        elif not path.exists():
            raise CLIError(f"{target!r} is neither a zoo id ({', '.join(list_models())}) nor an existing file "
                           "or run folder")
        if not os.access(path, os.R_OK):
            raise CLIError(f"cannot read {str(path)!r}: permission denied")
        verified = False  # a lone file records nothing to check it against
        if folder is not None:  # do its files belong together? checked before the model is loaded
            try:
                verified = verify_run_folder(folder)
            except RunFolderError as e:
                raise CLIError(str(e)) from None
            except OSError as e:
                raise CLIError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
        sqio = _io()
        t0 = time.perf_counter()
        model = sqio.load(path, allow_entry_point=args.allow_entry_point or None)
        load_s = time.perf_counter() - t0
        zoo_id = getattr(model, "_specquant_model_id", None)
        if not zoo_id:
            raise CLIError(f"{str(path)!r} names no zoo model (it was saved with arch=), so no test set is known")
        entry = get_entry(zoo_id)
        _check_data_dir(entry, args.data_dir)
        if limit is None and run_config is not None:
            limit = run_config.get("limit")
        header = getattr(model, "specquant_header", {}) or {}
        storage = sqio.storage_breakdown(path)
        result.update({"model": zoo_id, "source": str(path), "verified": verified,
                       "quantized": bool(header.get("quantized")), "bits_per_weight": storage["bits_per_weight"],
                       "file_bytes": storage["file_bytes"]})
        meta = header.get("meta") or {}
        for k in ("method", "bits", "avg_bits", "seed"):
            if meta.get(k) is not None:
                result[k] = meta[k]
    x_test, y_test = _test_set(entry, args.data_dir, limit)
    t0 = time.perf_counter()
    acc = evaluate(model, x_test, y_test, ui, "eval")
    result["accuracy"] = acc
    if result["source"] == "zoo":
        result["float_accuracy"] = acc
    result["n_test"] = int(x_test.shape[0])
    if run_metrics is not None and "accuracy" in run_metrics:
        result["recorded_accuracy"] = run_metrics["accuracy"]
        result["matches_recorded"] = run_metrics["accuracy"] == acc
    result.update({"load_seconds": load_s, "eval_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    cols = [("model", "model"), ("source", "source"), ("method", "method"), ("bits", "bits"),
            ("bits_per_weight", "bits/weight"), ("accuracy", "accuracy %"), ("recorded_accuracy", "recorded %"),
            ("n_test", "test images"), ("verified", "verified")]
    ui.say(format_table([result], [c for c in cols if c[0] in result]))
    if args.json:
        _emit_json(result)
    return 0


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------


def run_analyze(args, argv: list[str], analyze, folder: RunFolder | None, t_total: float):
    """The work of ``specquant analyze`` (``analyze`` is ``specquant.analyze.analyze``); with a
    ``folder``, writes the run folder into its staging folder. Returns (result, report)."""
    from specquant.models import get_model

    model, entry = get_model(args.model, args.data_dir)
    if args.calib:
        calib = entry.calib(args.calib, args.seed, args.data_dir)
        report = analyze(model, calib=calib)
    else:  # two training inputs only to fold BatchNorm and read the layer order
        calib = None
        report = analyze(model, example_input=entry.calib(2, args.seed, args.data_dir))
    full = report.to_dict()
    rows = report.to_rows()
    result = {"command": "analyze", "model": args.model, "n_calib": 0 if calib is None else int(calib.shape[0]),
              "seed": args.seed, "quantizer": full.get("quantizer"), "bits": full.get("bits"),
              "folded_bn": full.get("folded_bn"), "end_to_end": full.get("end_to_end"), "layers": rows,
              "total_seconds": time.perf_counter() - t_total, "peak_rss_mb": peak_rss_mb()}
    if folder is not None:
        from specquant.report import run_folder as rf

        names = [r["name"] for r in rows]
        ratios = {f"RTN {b}-bit: measured / bound (op norm)": [r.get(f"op_ratio_b{b}") for r in rows]
                  for b in (2, 4, 8) if f"op_ratio_b{b}" in (rows[0] if rows else {})}
        plots = {"layers.png": rf.plot_layers(names, ratios, [r.get("kappa") for r in rows],
                                              error_label="measured / bound",
                                              title=f"{args.model}: RTN error against the weight bound, and κ")}
        stamp = folder.stamp()  # run_id, in both files
        result.update(stamp)
        config_json = {**stamp, "command": "analyze", "command_line": _command_line(argv), "argv": argv,
                       "model": args.model, "calib": args.calib, "seed": args.seed, "data_dir": args.data_dir,
                       "versions": _versions(), "created": datetime.datetime.now().isoformat(timespec="seconds")}
        rf.write_run_folder(folder.path, config=config_json, metrics=result, layers=rows, plots=plots,
                            summary=[{"model": args.model, "seed": args.seed, "layers": len(rows)}],
                            title=f"specquant analyze: {args.model}")
    return result, report


def cmd_analyze(args, argv: list[str]) -> int:
    from specquant.models import get_entry

    try:
        from specquant.diagnostics.analyze import analyze
    except ImportError as e:
        if getattr(e, "name", None) not in ("specquant.diagnostics.analyze", None):
            raise
        raise CLIError("analyze is not available yet (specquant.analyze has not landed)") from None
    ui = _UI(args.quiet)
    t_total = time.perf_counter()
    entry = get_entry(args.model)
    _check_data_dir(entry, args.data_dir)
    with _run_folder(args.out, args.overwrite) as folder:
        result, report = run_analyze(args, argv, analyze, folder, t_total)
    ui.say(report.format_table())
    if folder is not None:
        ui.say(f"\nrun folder: {folder.target}  (open {folder.target / 'index.html'})")
    if args.json:
        _emit_json(result)
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specquant`` console script; returns the exit status."""
    from specquant.models.data import ENV_VAR, DataNotFoundError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                            format="%(message)s")
        return args.func(args, argv)
    except CLIError as e:
        return _fail(_one_line(e))
    except DataNotFoundError as e:
        msg = _one_line(e)
        if ENV_VAR not in msg and "--data-dir" not in msg:
            msg += f" (the data directory is set by --data-dir or {ENV_VAR})"
        return _fail(msg)
    except (ValueError, OSError) as e:
        if debug:
            raise
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - no traceback for users; SPECQUANT_DEBUG=1 shows it
        if debug:
            raise
        return _fail(f"internal error ({type(e).__name__}): {_one_line(e)} (set {DEBUG_ENV}=1 for the traceback)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
