"""``specquant analyze``: per-layer spectra, statistics and RTN error against the bounds
(:func:`specquant.diagnostics.analyze.analyze`), as a table, JSON and a run folder."""
from __future__ import annotations

import datetime
import time

from specquant.cli.common import (
    UI,
    check_data_dir,
    command_line,
    emit_json,
    load_entry_model,
    peak_rss_mb,
    resolve_entry,
    staged_run_folder,
    versions,
)
from specquant.diagnostics.analyze import analyze, column_glossary
from specquant.report import run_folder as rf
from specquant.report.run_folder import RunFolder


def _analyze_headline(rows: list[dict]) -> str:
    """The layer most worth protecting (largest κ) and how often the bound holds."""
    worst = max(rows, key=lambda r: r.get("kappa") or 0.0)
    ratios = [v for r in rows for k, v in r.items() if k.startswith("op_ratio_b") and v is not None]
    held = sum(v <= 1.0 for v in ratios)
    return (f"{len(rows)} layers; the largest condition number is κ = {worst.get('kappa', float('nan')):.3g} in "
            f"{worst['name']!r} (the first layer to give more bits); the operator-norm bound holds in {held} of "
            f"{len(ratios)} (layer, width) cases.")


def run_analyze(args, argv: list[str], folder: RunFolder | None, t_total: float, entry=None):
    """The work of ``specquant analyze``; with a ``folder``, writes the run folder into its
    staging folder. Returns (result, report)."""
    model, entry = load_entry_model(args.model, args.data_dir, args, entry)
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
        names = [r["name"] for r in rows]
        ratios = {f"RTN {b}-bit: measured / bound (op norm)": [r.get(f"op_ratio_b{b}") for r in rows]
                  for b in (2, 4, 8) if f"op_ratio_b{b}" in (rows[0] if rows else {})}
        plots = {"layers.png": rf.plot_layers(names, ratios, [r.get("kappa") for r in rows],
                                              error_label="measured / bound",
                                              title=f"{args.model}: RTN error against the weight bound, and κ",
                                              reference=1.0, reference_label="y = 1: above it the bound fails")}
        captions = {"layers.png": "top: round-to-nearest error divided by the note's bound ‖W‖_op/2^b, per layer "
                                  "and width (log scale); the dashed line is y = 1, and a point above it is a layer "
                                  "where the bound fails. Bottom: the condition number κ of each layer."}
        stamp = folder.stamp()  # run_id, in both files
        result.update(stamp)
        config_json = {**stamp, "command": "analyze", "command_line": command_line(argv), "argv": argv,
                       "model": args.model, "calib": args.calib, "seed": args.seed, "data_dir": args.data_dir,
                       "versions": versions(), "created": datetime.datetime.now().isoformat(timespec="seconds")}
        rf.write_run_folder(folder.path, config=config_json, metrics=result, layers=rows, plots=plots,
                            summary=[{"model": args.model, "seed": args.seed, "layers": len(rows)}],
                            title=f"specquant analyze: {args.model}", captions=captions,
                            glossary=column_glossary(rows[0].keys() if rows else ()),
                            headline=[_analyze_headline(rows)] if rows else ())
    return result, report


def cmd_analyze(args, argv: list[str]) -> int:
    ui = UI(args.quiet)
    t_total = time.perf_counter()
    entry = resolve_entry(args.model, args, need_calib=True, need_eval=False)
    check_data_dir(entry, args.data_dir)
    with staged_run_folder(args.out, args.overwrite) as folder:
        result, report = run_analyze(args, argv, folder, t_total, entry)
    ui.say(report.format_table())
    if folder is not None:
        ui.say(f"\nrun folder: {folder.target}  (open {folder.target / 'index.html'})")
    if args.json:
        emit_json(result)
    return 0
