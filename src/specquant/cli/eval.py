"""``specquant eval``: top-1 accuracy of a zoo model (float), a run folder or a saved file; a run
folder's files are checked to belong together before its model is loaded."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import specquant.io as sqio
from specquant.cli.common import (
    UI,
    CLIError,
    check_data_dir,
    emit_json,
    entry_metric,
    evaluate,
    lm_perplexity,
    load_entry_model,
    load_saved_model,
    load_test_set,
    peak_rss_mb,
    resolve_device,
    resolve_entry,
)
from specquant.io.files import read_json
from specquant.models import list_models
from specquant.models.hf import is_hf_folder
from specquant.models.user import is_entry_point
from specquant.models.zoo import did_you_mean
from specquant.report.run_folder import (
    CONFIG_JSON,
    METRICS_JSON,
    MODEL_FILE,
    RunFolderError,
    verify_run_folder,
)
from specquant.report.table import format_table


def cmd_eval(args, argv: list[str]) -> int:
    ui = UI(args.quiet)
    device = resolve_device(args.device)  # before any work
    target = args.target
    path = Path(target).expanduser()
    folder = run_config = run_metrics = None
    limit = args.limit
    result: dict = {}
    seed = 0
    if (not path.exists() and (target in list_models() or is_entry_point(target))) or is_hf_folder(path):
        entry = resolve_entry(target, args, need_calib=False)
        check_data_dir(entry, args.data_dir)
        t0 = time.perf_counter()
        model, entry = load_entry_model(target, args.data_dir, args, entry)
        load_s = time.perf_counter() - t0
        source = "zoo" if target in list_models() else ("builder" if is_entry_point(target) else "folder")
        result.update({"model": entry.id, "source": source, "quantized": False})
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
            raise CLIError(f"{target!r} is neither a zoo id{did_you_mean(target)} ({', '.join(list_models())}), "
                           "MODULE:FUNCTION, nor an existing file or run folder")
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
        run_config = run_config if isinstance(run_config, dict) else None
        if args.eval_data is None and run_config is not None and isinstance(run_config.get("eval_data"), str):
            args.eval_data = run_config["eval_data"]  # the run's own test file
        t0 = time.perf_counter()
        model, entry = load_saved_model(path, args.allow_entry_point, args)
        load_s = time.perf_counter() - t0
        zoo_id = entry.id
        check_data_dir(entry, args.data_dir)
        if limit is None and run_config is not None:
            limit = run_config.get("limit")
        if run_config is not None and isinstance(run_config.get("seed"), int):
            seed = run_config["seed"]  # the same test subset as the run's --limit
        header = getattr(model, "specquant_header", {}) or {}
        storage = sqio.storage_breakdown(path)
        result.update({"model": zoo_id, "source": str(path), "verified": verified,
                       "quantized": bool(header.get("quantized")), "bits_per_weight": storage["bits_per_weight"],
                       "file_bytes": storage["file_bytes"]})
        meta = header.get("meta") or {}
        for k in ("method", "bits", "avg_bits", "seed"):
            if meta.get(k) is not None:
                result[k] = meta[k]
    model.to(device)
    if entry.kind == "lm":
        return _eval_lm(args, ui, entry, model, result, run_config, run_metrics, load_s)
    metric = entry_metric(entry, args, (run_config or {}).get("metric") if run_config else None)
    x_test, y_test = load_test_set(entry, args.data_dir, limit, seed)
    t0 = time.perf_counter()
    score = evaluate(model, x_test, y_test, ui, "eval", metric=metric)
    key = "accuracy" if metric is None else "metric"
    if metric is not None:
        result["metric_name"] = metric[0]
    result[key] = score
    if not result["quantized"]:
        result[f"float_{key}"] = score
    result["n_test"] = int(x_test.shape[0])
    if run_metrics is not None and key in run_metrics:
        result[f"recorded_{key}"] = run_metrics[key]
        result["matches_recorded"] = run_metrics[key] == score
    result.update({"load_seconds": load_s, "eval_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    cols = [("model", "model"), ("source", "source"), ("method", "method"), ("bits", "bits"),
            ("bits_per_weight", "bits/weight"), ("accuracy", "accuracy %"), ("recorded_accuracy", "recorded %"),
            ("metric_name", "metric"), ("metric", "value"), ("recorded_metric", "recorded"),
            ("n_test", "test samples"), ("verified", "verified")]
    ui.say(format_table([result], [c for c in cols if c[0] in result]))
    if args.json:
        emit_json(result)
    return 0


def _eval_lm(args, ui: UI, entry, model, result: dict, run_config, run_metrics, load_s: float) -> int:
    """Perplexity of a language model on the WikiText-2 test text (the protocol of eval.perplexity)."""
    seq_len = args.seq_len or (run_config or {}).get("seq_len") or entry.extra["seq_len"]
    windows = args.eval_windows or (run_config or {}).get("eval_windows")
    ids, _ = entry.test(args.data_dir)
    t0 = time.perf_counter()
    res = lm_perplexity(model, ids, seq_len, windows, ui)
    result.update(res.to_dict())
    if not result["quantized"]:
        result["float_perplexity"] = res.perplexity
    if run_metrics is not None and "perplexity" in run_metrics:
        result["recorded_perplexity"] = run_metrics["perplexity"]
        result["matches_recorded"] = run_metrics["perplexity"] == res.perplexity
    result.update({"load_seconds": load_s, "eval_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    cols = [("model", "model"), ("source", "source"), ("method", "method"), ("bits", "bits"),
            ("bits_per_weight", "bits/weight"), ("perplexity", "perplexity"), ("recorded_perplexity", "recorded"),
            ("tokens", "tokens"), ("seq_len", "window"), ("verified", "verified")]
    ui.say(format_table([result], [c for c in cols if c[0] in result]))
    if args.json:
        emit_json(result)
    return 0
