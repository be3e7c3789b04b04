"""The argument parser of ``specquant`` and the argument types of its options (each error is one
line, raised as :class:`~specquant.cli.common.CLIError`)."""
from __future__ import annotations

import argparse
import math
import textwrap

from specquant._version import __version__
from specquant.algorithms import get_method, method_choices, method_names
from specquant.algorithms.frame import FrameConfig
from specquant.cli.analyze import cmd_analyze
from specquant.cli.common import PROG, CLIError
from specquant.cli.demo import DEMO_REDUNDANCY, cmd_demo
from specquant.cli.eval import cmd_eval
from specquant.cli.export import FORMATS as EXPORT_FORMATS
from specquant.cli.export import cmd_export
from specquant.cli.quantize import GGUF_GRIDS, POLICIES, cmd_quantize
from specquant.cli.sweep import cmd_sweep
from specquant.cli.train import cmd_train
from specquant.core.actquant import ACT_CALIBRATORS, ACT_GRANULARITIES, ACT_GRIDS
from specquant.core.grid import Granularity
from specquant.models import list_models
from specquant.models.user import DATA_FORMAT_HELP
from specquant.qat import AUGMENTS, KAPPA_KINDS, OPTIMIZERS

DEFAULT_CALIB = 512


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


def _protect(text: str) -> tuple[str, int | None]:
    """``NAME_PATTERN=BITS`` (BITS 1..8, or ``float`` to keep the layers in float)."""
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"--protect takes NAME_PATTERN=BITS (e.g. 'lm_head=8', "
                                         f"'model.layers.0.*=8', '*.down_proj=float'), got {text!r}")
    if bits.strip().lower() == "float":
        return pattern, None
    return pattern, _bits(bits)


def _avg_bits(text: str) -> float:
    try:
        a = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"average bits must be a number from 1 to 8, got {text!r}") from None
    if not (math.isfinite(a) and 1.0 <= a <= 8.0):
        raise argparse.ArgumentTypeError(f"average bits must be a number from 1 to 8, got {text}")
    return a


def _int_at_least(text: str, minimum: int, what: str) -> int:
    """``text`` as an integer ≥ ``minimum``; else an argparse error saying ``what`` was expected."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"{what}, got {n}")
    return n


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "expected a positive integer")


def _seed(text: str) -> int:
    return _int_at_least(text, 0, "seed must be a non-negative integer")


def _float_at_least(text: str, minimum: float, what: str) -> float:
    """``text`` as a finite number ≥ ``minimum``; else an argparse error saying ``what`` was expected."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v >= minimum):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return v


def _nonnegative_float(text: str) -> float:
    return _float_at_least(text, 0.0, "expected a finite number >= 0")


def _positive_float(text: str) -> float:
    v = _nonnegative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _decay(text: str) -> float:
    """A decay in [0, 1) (--ema)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {text!r}")
    return v


def _unit(what: str):
    """A parser of numbers in [0, 1]; errors name ``what``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"{what} must be a number in [0, 1], got {text!r}")
        return v
    return parse


def _alpha(text: str) -> float:
    """SmoothQuant's α: a number in [0, 1]."""
    return _unit("SmoothQuant alpha")(text)


def _add_lm(p: argparse.ArgumentParser) -> None:
    """The language-model settings (ignored by classifiers)."""
    p.add_argument("--seq-len", metavar="L", type=_positive_int, default=None,
                   help="language models: tokens per window, for calibration and perplexity (default: the zoo "
                        "entry's, 256 for stories260k, 2048 for smollm2-135m)")
    p.add_argument("--eval-windows", metavar="N", type=_positive_int, default=None,
                   help="language models: perplexity on the first N non-overlapping windows of the WikiText-2 test "
                        "text only, for quick runs (default: the whole text)")


def _granularity(text: str) -> str:
    try:
        return Granularity.parse(text).label()
    except ValueError:
        raise argparse.ArgumentTypeError(f"granularity must be 'channel', 'tensor' or 'group:G' (G >= 1), "
                                         f"got {text!r}") from None


def _redundancy(text: str) -> float:
    return _float_at_least(text, 1.0, "redundancy must be a number >= 1")


def _frame_default_redundancy() -> float:
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


def _add_user_data(p: argparse.ArgumentParser) -> None:
    """--eval-data and --metric (quantize and eval)."""
    p.add_argument("--eval-data", metavar="FILE", default=None,
                   help=f"test inputs and targets from a file instead of the zoo test set (required for "
                        f"MODULE:FUNCTION models): {DATA_FORMAT_HELP} (default: the model's own test set)")
    p.add_argument("--metric", metavar="MODULE:FUNCTION", type=_entry_point, default=None,
                   help="score with your function metric(outputs, targets) -> float, called once on the outputs of "
                        "the whole test set (outputs: the model's output tensor, targets: the y of --eval-data); "
                        "reported as metric / float_metric (default: top-1 accuracy in percent)")


def _add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="MODULE:FUNCTION models: the trained weights, a .safetensors state dict (or .pt, read with "
                        "weights_only=True), loaded with strict=True (default: the weights your function returns)")


def _add_calib_data(p: argparse.ArgumentParser, use: str) -> None:
    p.add_argument("--calib-data", metavar="FILE", default=None,
                   help=f"calibration inputs from a file (required for MODULE:FUNCTION models; {use}): "
                        f"{DATA_FORMAT_HELP.replace(' [and y (N,) for --eval-data]', '')} (default: the zoo model's "
                        "training split)")


def _add_user_model(p: argparse.ArgumentParser) -> None:
    """The options of a MODULE:FUNCTION model (and of data files for a zoo classifier)."""
    _add_weights(p)
    _add_calib_data(p, "--calib N of them are drawn with --seed")
    _add_user_data(p)


def _device(text: str) -> str:
    t = text.strip().lower()
    if t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="D", type=_device, default="cpu",
                   help="where the model, the calibration statistics and the algorithms run: cpu, cuda, cuda:N, or "
                        "auto (CUDA when torch sees one, else the CPU); the packed model is saved from the CPU "
                        "(default: cpu)")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    """--nproc and --dist-timeout (cli/distributed.py)."""
    p.add_argument("--nproc", metavar="N", type=_positive_int, default=1,
                   help="run N ranks on this machine (torch.distributed, gloo over 127.0.0.1; OMP_NUM_THREADS "
                        "threads each, 1 unless set): each streams a contiguous share of the calibration batches, "
                        "the statistics are exchanged, same codes and run folder as one process (with --avg-bits the "
                        "sensitivity pass is shared layer by layer); not with --act-bits, --smoothquant or awq "
                        "methods. Several machines: torchrun, see the README "
                        "(default: 1)")
    p.add_argument("--calib-batch", metavar="B", type=_positive_int, default=128,
                   help="calibration samples (windows) per forward pass of the statistics; N ranks need at least "
                        "N batches, and a run gives the same codes with any --nproc at the same B (default: 128)")
    p.add_argument("--dist-timeout", metavar="SECONDS", type=_positive_float, default=1800.0,
                   help="with several ranks: how long a rank waits in one exchange before the run fails; must "
                        "exceed the longest stretch one rank works alone (rank 0's float evaluation, one block's "
                        "statistics) (default: 1800)")


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
    models = ", ".join(list_models())
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description=_wrap("specquant: post-training weight quantization of PyTorch networks "
                    "(RTN, GPFQ, SPFQ, GPTQ, Qronos, frame Sigma-Delta, AWQ)."),
        epilog=f"zoo models: {models}\nrun 'specquant COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    # demo ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo", formatter_class=_Formatter, help="quantize digits-mlp with every method at 2, 3, 4 bits",
        description=_wrap("Train (in about a second) the digits-mlp classifier on scikit-learn's 8x8 digits, "
                    f"quantize it with every method ({', '.join(method_names())}) at 2, 3 and 4 bits, print "
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
    p.add_argument("model", metavar="MODEL", help=f"zoo id ({models}), a Hugging Face causal-LM folder "
                                                  "(config.json, *.safetensors, tokenizer files), or MODULE:FUNCTION: "
                                                  "your own function that returns the torch.nn.Module (imported from "
                                                  "PYTHONPATH or the current folder, because you name it), with "
                                                  "--weights, --calib-data and --eval-data")
    _add_user_model(p)
    p.add_argument("--method", required=True, choices=method_choices(), metavar="METHOD",
                   help="; ".join(f"{m}: {get_method(m).summary}" for m in method_names())
                   + ". awq+NAME (" + ", ".join(c for c in method_choices() if c.startswith("awq+"))
                   + "): method NAME with the AWQ pre-step (activation-aware input-channel scales searched on "
                   "the calibration data and folded into the preceding norm / up_proj / Linear, the float model "
                   "unchanged), then NAME's rounding. Required (no default).")
    p.add_argument("--bits", metavar="B", type=_bits, default=None,
                   help="bits per weight code, 1..8 (for frame: per Sigma-Delta code) (default: none; "
                        "required unless --avg-bits is given)")
    p.add_argument("--granularity", metavar="G", type=_granularity, default="channel",
                   help="scale granularity: channel (one per output channel), tensor, or group:G "
                        "(G consecutive inputs per scale; when G does not divide a layer's inputs its "
                        "last group is shorter) (default: channel)")
    p.add_argument("--asymmetric", action="store_true",
                   help="asymmetric grid with a zero point per scale (2^b levels), as usual for LLM weights "
                        "(default: narrow symmetric, 2^b - 1 levels)")
    p.add_argument("--gguf", metavar="TYPE", choices=GGUF_GRIDS, default=None,
                   help="quantize on the block grid of GGUF type TYPE (q4_0: 4-bit symmetric, q8_0: 8-bit symmetric, "
                        "q4_1: 4-bit asymmetric; groups of 32 inputs, float16 scales) so that 'specquant export "
                        "--format gguf' writes the codes exactly; sets --bits, --granularity group:32 (and "
                        "--asymmetric for q4_1); with q4_0, --protect NAME=8 layers become Q8_0; layers whose input "
                        "width is not a multiple of 32 stay in float (default: none)")
    p.add_argument("--protect", metavar="NAME_PATTERN=BITS", type=_protect, action="append", default=None,
                   help="keep the modules matching NAME_PATTERN (a name or fnmatch pattern) at BITS (1..8) or "
                        "in float ('float'); repeatable, the first matching pattern applies (e.g. "
                        "--protect 'model.layers.0.*=8' --protect '*.down_proj=6') (default: none)")
    p.add_argument("--act-bits", metavar="A", type=_bits, default=None,
                   help="also quantize the input of every quantized layer: a static per-tensor asymmetric A-bit "
                        "quantizer (1..8) calibrated on the calibration inputs of the partly quantized model, "
                        "so later layers' methods see quantized activations (default: none, float activations)")
    p.add_argument("--act-calibrator", metavar="C", choices=ACT_CALIBRATORS, default=None,
                   help="how --act-bits chooses each range: " + ", ".join(ACT_CALIBRATORS)
                        + " (aciq = aciq-laplace) (default: mse)")
    p.add_argument("--grid", metavar="KIND", choices=ACT_GRIDS, default="int",
                   help="weight grid: int (the integer grids), fp8-e4m3 (OCP E4M3 'fn', max 448) or fp8-e5m2 "
                        "(max 57344): 8-bit float codes, stored as their bit patterns, one scale per block "
                        "mapping the block's clipping value to the format's max; implies --bits 8 and is refused "
                        "with other widths, --asymmetric, --gguf, --avg-bits and --method frame (default: int)")
    p.add_argument("--act-grid", metavar="KIND", choices=ACT_GRIDS, default="int",
                   help="grid of the --act-bits input quantizers: int (asymmetric uniform) or fp8-e4m3 / fp8-e5m2 "
                        "(per-tensor scale, zero point 0); an FP8 grid implies --act-bits 8 (default: int)")
    p.add_argument("--act-granularity", metavar="G", choices=ACT_GRANULARITIES, default=None,
                   help="with --act-bits: 'tensor' (one static range per layer input, calibrated) or 'token' "
                        "(each token's own asymmetric range at run time; Linear inputs, language models) "
                        "(default: tensor)")
    p.add_argument("--smoothquant", metavar="ALPHA", type=_alpha, default=None,
                   help="SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights with "
                        "strength ALPHA in [0, 1] (0.5 is the paper's default) before quantizing; the float "
                        "function is unchanged; language models (default: off)")
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
                   help="evaluate on N test samples only, for quick checks: a subset seeded by --seed in which every "
                        "class keeps its share (test files sorted by class, like CIFAR-10's, stay representative); "
                        "classifiers only (default: all)")
    _add_lm(p)
    _add_device(p)
    _add_distributed(p)
    _add_common(p, json_help="print the metrics as one JSON object on stdout.")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="out-of-core: quantize a Hugging Face folder block by block within SIZE of memory (3GB, "
                        "500MB, 2GiB; GB = 10^9 bytes): weights read lazily from the safetensors shards, cached "
                        "activations spilled to memory-mapped temporary files beyond what the limit leaves, the "
                        "packed file written block by block; refused up front when the expected peak exceeds "
                        "SIZE; no float/quantized evaluation (default: none, the whole model in memory)")
    p.set_defaults(func=cmd_quantize)

    # eval ------------------------------------------------------------------------------------
    p = sub.add_parser(
        "eval", formatter_class=_Formatter,
        help="top-1 accuracy (classifiers) or perplexity (language models) of a zoo model, a run folder or a file",
        description=_wrap("Evaluate on the test set (language models: perplexity on the WikiText-2 test text, "
                    "non-overlapping windows of --seq-len tokens, JSON keys perplexity, tokens, seq_len): a zoo "
                    "id gives the float model's accuracy; a run folder "
                    "(written by 'specquant quantize --out DIR') or a .safetensors file written by "
                    "specquant.save gives the saved quantized model's accuracy. A run folder is evaluated "
                    "on the same test images as the run (its --limit), and its recorded accuracy is shown "
                    "next to the new one. Its files are checked first: config.json and metrics.json must "
                    "name the same run (run_id) and model.safetensors must have the SHA-256 they record, "
                    "else eval fails; a folder from an older specquant records neither and is evaluated "
                    "with \"verified\": false."))
    p.add_argument("target", metavar="MODEL_OR_DIR_OR_FILE",
                   help=f"zoo id ({models}), MODULE:FUNCTION (your builder, with --weights and --eval-data), run "
                        "folder or file")
    p.add_argument("--limit", metavar="N", type=_positive_int, default=None,
                   help="evaluate on N test samples only, a class-stratified subset seeded like the run's (--seed of "
                        "the run folder, else 0) (default: all, or the run folder's limit)")
    _add_weights(p)
    _add_user_data(p)
    p.add_argument("--allow-entry-point", metavar="MODULE:FUNCTION", action="append", type=_entry_point,
                   default=None,
                   help="loading a file that names this architecture builder (instead of a zoo id) will import "
                        "and call it; only for files you trust; repeat for several (default: off, such files "
                        "are refused)")
    _add_lm(p)
    _add_device(p)
    _add_common(p, json_help="print the result as one JSON object on stdout.")
    p.set_defaults(func=cmd_eval)

    # export ----------------------------------------------------------------------------------
    p = sub.add_parser(
        "export", formatter_class=_Formatter, help="write a quantized model as GGUF (llama.cpp) or ONNX (onnxruntime)",
        description=_wrap("Write a saved quantized model (a run folder of 'specquant quantize --out', or its model "
                    "file) in another runtime's format, with specquant's own codes: GGUF (language models of the "
                    "Llama family; layers quantized with --gguf q4_0 / q8_0 become Q4_0 / Q8_0 blocks, layers left "
                    "in float F32, tokenizer included) or ONNX (Linear layers as com.microsoft.MatMulNBits). A layer "
                    "the format cannot hold exactly is refused with one line naming it, never re-rounded. JSON keys "
                    "with --json: file, bytes, format, type."),
        epilog="example: specquant quantize stories260k --method gptq --gguf q4_0 --out run\n"
               "         specquant export run --format gguf --out stories-q4_0.gguf --json")
    p.add_argument("target", metavar="RUN_DIR_OR_FILE", help="run folder or saved model file")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="gguf or onnx (required)")
    p.add_argument("--out", metavar="FILE", required=True, help="the file to write (written whole or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--float-type", choices=("f32", "f16"), default="f32",
                   help="GGUF: type of the weight matrices left in float (f16 is what llama.cpp's quantizer falls "
                        "back to; f32 keeps them exact) (default: f32)")
    p.add_argument("--allow-entry-point", metavar="MODULE:FUNCTION", action="append", type=_entry_point,
                   default=None, help="as for eval: only for files you trust (default: off)")
    _add_common(p, json_help="print file, bytes, format, type (and the tensor types) as one JSON object.")
    p.set_defaults(func=cmd_export)

    # analyze ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "analyze", formatter_class=_Formatter, help="per-layer spectral and statistics table",
        description=_wrap("Per-layer diagnostics of a zoo model or your own (MODULE:FUNCTION): norms, condition "
                          "number, ranks, weight statistics, "
                    "measured RTN error against the bounds."))
    p.add_argument("model", metavar="MODEL",
                   help=f"zoo id ({models}) or MODULE:FUNCTION (your builder, with --weights and --calib-data)")
    p.add_argument("--calib", metavar="N", type=_positive_int, default=None,
                   help="also use N calibration samples for the output-error bound (default: none, weights only)")
    _add_weights(p)
    _add_calib_data(p, "two of them fold BatchNorm and give the layer order, --calib N feed the bounds")
    p.add_argument("--seed", metavar="S", type=_seed, default=0, help="seed of the calibration draw (default: 0)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"write a run folder here: metrics.json, layers.csv, a κ plot, index.html; {OUT_HELP} "
                        "(default: none)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_common(p, json_help="print the per-layer rows as one JSON object on stdout.")
    p.set_defaults(func=cmd_analyze)

    # train -----------------------------------------------------------------------------------
    p = sub.add_parser(
        "train", formatter_class=_Formatter, help="quantization-aware fine-tuning of a quantize run folder",
        description=_wrap("Fine-tune a quantized zoo classifier on its training split (CIFAR-10: "
                          "cifar10/train-10k.npz, MNIST: its 60,000 training images, digits: its 1,437 training "
                          "samples; never the test set) with quantization in the loop: each quantized layer keeps "
                          "a float latent weight, initialised from the run's dequantized weights, whose codes are "
                          "re-rounded on the run's grid at every step (straight-through estimator); scales fixed "
                          "or learned (--lsq). The trained codes are saved packed on the same grid. JSON keys: "
                          "accuracy, ptq_accuracy, float_accuracy, epochs, train_seconds, ..."),
        epilog="example: specquant quantize resnet20-cifar10 --method gpfq --bits 2 --out runs/gpfq2\n"
               "         specquant train resnet20-cifar10 --from runs/gpfq2 --epochs 15 --lr 1e-4 --out runs/qat2")
    p.add_argument("model", metavar="MODEL", help=f"zoo id of a classifier ({models}); must be the run's model")
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR", required=True,
                   help="the run folder of 'specquant quantize --out' to start from (its codes and scales) (required)")
    p.add_argument("--epochs", metavar="E", type=_positive_int, required=True, help="passes over the training split "
                                                                                   "(required)")
    p.add_argument("--lr", metavar="LR", type=_positive_float, default=1e-4,
                   help="peak learning rate, cosine decay to 0 (default: 1e-4, for Adam)")
    p.add_argument("--kappa-reg", metavar="LAMBDA", type=_nonnegative_float, default=0.0,
                   help="weight of the kappa-regularizer: LAMBDA times the sum over quantized layers of log kappa(W) "
                        "of the latent weights (default: 0, off)")
    p.add_argument("--kappa-kind", choices=KAPPA_KINDS, default="log",
                   help="the penalty: log (log kappa(W)) or ratio (||W||_op / sigma_min) (default: log)")
    p.add_argument("--lsq", action="store_true",
                   help="learn the weight scales and the steps of static input quantizers (--act-bits runs) with "
                        "LSQ (Esser et al. 2020) (default: the run's scales and steps, fixed)")
    p.add_argument("--scale-lr-factor", metavar="F", type=_positive_float, default=1.0,
                   help="with --lsq: the learned steps' learning rate is --lr times F (default: 1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam, or sgd (momentum 0.9, Nesterov) (default: adam)")
    p.add_argument("--weight-decay", metavar="WD", type=_nonnegative_float, default=0.0,
                   help="weight decay of the latent weights and biases (default: 0)")
    p.add_argument("--batch-size", metavar="B", type=_positive_int, default=128, help="samples per step (default: 128)")
    p.add_argument("--augment", choices=("auto",) + AUGMENTS, default="auto",
                   help="crop-flip: random crops of the 4-pixel-padded images and horizontal flips; auto: crop-flip "
                        "for image inputs, none otherwise (default: auto)")
    p.add_argument("--distill", action="store_true",
                   help="distil from a float teacher as well (Hinton et al. 2015): (1 - A) * CE + A * T^2 * KL on "
                        "softened outputs; the teacher is MODEL's float network unless --teacher says otherwise")
    p.add_argument("--teacher", metavar="MODEL", default=None,
                   help="with --distill: the zoo classifier to distil from (same inputs and classes) (default: MODEL)")
    p.add_argument("--distill-alpha", metavar="A", type=_unit("--distill-alpha"), default=0.5,
                   help="with --distill: weight of the soft term (default: 0.5)")
    p.add_argument("--distill-temperature", metavar="T", type=_positive_float, default=4.0,
                   help="with --distill: softening temperature (default: 4)")
    p.add_argument("--feature-distill", metavar="BETA", type=_nonnegative_float, default=0.0,
                   help="with --distill: add BETA times the mean relative squared error between the student's and the "
                        "teacher's outputs of the --feature-layers modules (FitNets-style hints) (default: 0, off)")
    p.add_argument("--feature-layers", metavar="NAME", nargs="+", default=(),
                   help="with --feature-distill: the modules (in both networks) whose outputs are matched, e.g. "
                        "layer1.0 layer1.1 ... layer3.2 for ResNet-20's residual blocks")
    p.add_argument("--mixup", metavar="M", type=_nonnegative_float, default=0.0,
                   help="mixup: every batch blended with a shuffled copy of itself by a weight drawn from Beta(M, M), "
                        "the label loss mixed alike (default: 0, off)")
    p.add_argument("--batch-norm", action="store_true",
                   help="train each quantized convolution with a BatchNorm on its output (batch statistics, as before "
                        "PTQ folded the BatchNorms), re-estimated at the end and folded into its per-channel scales "
                        "and bias (codes unchanged); needs per-channel or per-group scales")
    p.add_argument("--ema", metavar="D", type=_decay, default=0.0,
                   help="end on an exponential moving average of the trained parameters with decay D in [0, 1), "
                        "e.g. 0.998 (default: 0, off)")
    p.add_argument("--seed", metavar="S", type=_seed, default=0,
                   help="seed of the sample order and the augmentation (default: 0)")
    p.add_argument("--limit", metavar="N", type=_positive_int, default=None,
                   help="evaluate on N test samples only (class-stratified, seeded like the run) (default: the run's "
                        "--limit, else all)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"write a run folder here (model.safetensors, config.json, metrics.json, layers.csv, "
                        f"index.html); {OUT_HELP} (default: none)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    _add_device(p)
    _add_common(p, json_help="print the metrics as one JSON object on stdout.")
    p.set_defaults(func=cmd_train)

    # sweep -----------------------------------------------------------------------------------
    p = sub.add_parser(
        "sweep", formatter_class=_Formatter, help="quantize with several methods, widths and seeds; one table",
        description=_wrap("Run 'specquant quantize MODEL --method M --bits B --seed S OPTIONS' for every M, B and "
                          "S (OPTIONS: quantize's own options, after '--'), with no run folder, and print one table "
                          "(score, float score, true bits per weight, size against float, seconds) with the Pareto "
                          "front and the recommended run. With --nproc N the runs are dealt out over N ranks (run k "
                          "on rank k mod N, each whole); the scores are those of one process. JSON keys: command, "
                          "model, options, score, runs, recommended, total_seconds (and nproc, comm_bytes)."),
        epilog="example: specquant sweep resnet20-cifar10 --methods rtn gptq gpfq --bits 2 3 4 --nproc 2 --json "
               "-- --calib 512 --limit 2000")
    p.add_argument("model", metavar="MODEL", help=f"as for quantize: a zoo id ({models}), a Hugging Face causal-LM "
                                                  "folder, or MODULE:FUNCTION with its options after '--'")
    p.add_argument("--methods", nargs="+", required=True, choices=method_choices(), metavar="METHOD",
                   help="methods to run, as quantize's --method (required)")
    p.add_argument("--bits", nargs="+", required=True, type=_bits, metavar="B", help="widths, 1..8 (required)")
    p.add_argument("--seeds", nargs="+", type=_seed, default=[0], metavar="S",
                   help="seeds of the calibration draw and random choices (default: 0)")
    p.add_argument("--nproc", metavar="N", type=_positive_int, default=1,
                   help="deal the runs out over N ranks on this machine (torch.distributed, gloo over 127.0.0.1; "
                        "OMP_NUM_THREADS threads each, 1 unless set); several machines: torchrun (default: 1)")
    p.add_argument("--dist-timeout", metavar="SECONDS", type=_positive_float, default=86400.0,
                   help="with several ranks: how long a rank waits for the others' runs before the sweep fails "
                        "(default: 86400)")
    _add_common(p, json_help="print the runs, the Pareto front and the recommendation as one JSON object on stdout.")
    p.set_defaults(func=cmd_sweep, passthrough=[])
    return parser
