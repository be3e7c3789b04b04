"""``specquant quantize HF_FOLDER --max-memory 3GB``: the out-of-core path of ``quantize``.

The folder's weights are read block by block (``specquant.outofcore.quantize_folder``) and the
packed file is written without ever holding the model; the float and quantized models are not
evaluated (that would need the whole model), so the metrics have no perplexity keys.  With
``--out`` the run folder holds the packed model, config.json and metrics.json.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time
from pathlib import Path

from specquant.algorithms.base import split_method
from specquant.cli.common import (
    MODEL_FILE,
    UI,
    CLIError,
    command_line,
    config_dict,
    emit_json,
    layer_records,
    staged_run_folder,
    versions,
)
from specquant.io.files import write_json
from specquant.outofcore import parse_memory, quantize_folder
from specquant.report.table import format_table


def check_out_of_core(args, entry) -> int | None:
    """The limit of ``--max-memory`` in bytes (None without it), after every check of the
    arguments it does not combine with: one-line errors, before any work."""
    text = getattr(args, "max_memory", None)
    if text is None:
        return None
    try:
        limit = parse_memory(text)
    except ValueError as e:
        raise CLIError(f"quantize: --max-memory: {e}") from None
    if entry.extra.get("hf_folder") is None:
        raise CLIError("quantize: --max-memory reads a Hugging Face model folder block by block; "
                       f"{args.model!r} is not one")
    refused = [("--avg-bits", args.avg_bits is not None), ("--gguf", getattr(args, "gguf", None) is not None),
               (f"--method {args.method}", split_method(args.method)[1] or args.method == "awq")]
    for flag, on in refused:
        if on:
            raise CLIError(f"quantize: --max-memory does not combine with {flag} (it needs the whole model at once)")
    if args.device not in (None, "cpu"):
        raise CLIError("quantize: --max-memory runs on the CPU (its limit is the process's memory); drop --device")
    return limit


def cmd_quantize_out_of_core(args, argv: list[str], config, entry, limit: int) -> int:
    """The out-of-core ``quantize``: quantize, write the packed file (and the run folder), report."""
    ui = UI(args.quiet)
    t_total = time.perf_counter()
    seq_len = args.seq_len or entry.extra["seq_len"]
    calib = entry.calib(args.calib, args.seed, args.data_dir, seq_len=seq_len)
    folder_path = entry.extra["hf_folder"]
    with staged_run_folder(args.out, args.overwrite) as folder:
        tmp = None if folder is not None else tempfile.TemporaryDirectory(prefix="specquant-")
        try:
            path = (folder.path if folder is not None else Path(tmp.name)) / MODEL_FILE
            ui.say(f"quantizing {args.model} out of core (--max-memory {args.max_memory}) with {args.method} at "
                   f"{args.bits} bits, {calib.shape[0]} calibration windows of {seq_len} tokens ...")
            res = quantize_folder(folder_path, config, calib, path, max_memory=limit, progress=ui.progress,
                                  meta={"model": args.model, "method": args.method, "bits": args.bits,
                                        "granularity": args.granularity, "calib": args.calib, "seed": args.seed})
            report = res.report
            metrics = {
                "command": "quantize", "model": args.model, "method": args.method, "bits": args.bits,
                "avg_bits": report.avg_bits, "granularity": args.granularity, "symmetric": not args.asymmetric,
                "bits_per_weight": report.bits_per_weight, "file_bytes": os.path.getsize(path),
                "n_calib": report.n_calib, "seq_len": seq_len, "num_weights": report.num_weights, "seed": args.seed,
                "quant_seconds": report.seconds, "total_seconds": time.perf_counter() - t_total,
                "peak_rss_mb": report.peak_rss_mb, "out_of_core": True, **res.to_dict(),
                "skipped": [dataclasses.asdict(s) for s in report.skipped],
                "layers": layer_records(report, {}),
            }
            if folder is not None:
                stamp = folder.stamp()
                metrics.update(stamp)
                write_json(folder.path / "metrics.json", metrics)
                write_json(folder.path / "config.json", {
                    **stamp, "command": "quantize", "command_line": command_line(argv), "argv": argv,
                    "model": args.model, "method": args.method, "bits": args.bits, "granularity": args.granularity,
                    "calib": args.calib, "seed": args.seed, "seq_len": seq_len, "max_memory": args.max_memory,
                    "data_dir": args.data_dir, "quant_config": config_dict(config), "versions": versions(),
                    "created": datetime.datetime.now().isoformat(timespec="seconds")})
        finally:
            if tmp is not None:
                tmp.cleanup()
    ui.say(format_table([metrics], [("model", "model"), ("method", "method"), ("bits", "bits"),
                                    ("bits_per_weight", "bits/weight"), ("blocks", "blocks"),
                                    ("quant_seconds", "quant s"), ("peak_rss_mb", "peak RSS MB"),
                                    ("max_memory_mb", "limit MB"), ("spilled_mb", "spilled MB")]))
    if folder is not None:
        ui.say(f"\nrun folder: {folder.target}")
    if args.json:
        emit_json(metrics)
    return 0
