"""``specquant demo``: train digits-mlp, quantize it with every method at 2, 3 and 4 bits; quantize
the stories260k language model with the best method at 2, 3 and 4 bits (perplexity and a greedy
sample before and after; only when the data directory is there, else said and skipped); print the
tables and write the run folder."""
from __future__ import annotations

import copy
import datetime
import os
import time

import specquant as sq
from specquant.algorithms import method_names
from specquant.cli.common import (
    FRAME_SWEEP,
    UI,
    command_line,
    config_dict,
    emit_json,
    evaluate,
    folded_float,
    layer_records,
    make_config,
    payload_bpw,
    peak_rss_mb,
    save_and_measure,
    staged_run_folder,
    versions,
)
from specquant.diagnostics.sweeps import frame_redundancy_sweep, layer_kappas
from specquant.eval.perplexity import perplexity
from specquant.models import DataNotFoundError, get_model
from specquant.models.data import data_dir as resolve_data_dir
from specquant.models.llama2c import BOS_ID, greedy_generate
from specquant.report import run_folder as rf
from specquant.report.decide import BPW_DEFINITION, BitsPerWeight, Recommendation, mark_sweep, size_vs_float
from specquant.report.run_folder import RunFolder
from specquant.report.table import format_table

DEMO_MODEL = "digits-mlp"
DEMO_BITS = (2, 3, 4)
DEMO_REDUNDANCY = 1.5  # frame redundancy N/d used by the demo (true storage ≈ 1.5 × code bits)
DEMO_LM = "stories260k"  # the language model of the demo (needs the data directory)
DEMO_LM_METHOD = "qronos"  # its method: the best on stories260k in BENCHMARKS.md (clearly so at 2 bits)
DEMO_LM_SEQ_LEN = 256  # window length of its calibration and perplexity
DEMO_LM_CALIB = 32  # calibration windows (validation text)
DEMO_LM_WINDOWS = 16  # perplexity windows (the first ones of the test text)
DEMO_LM_NEW_TOKENS = 40  # length of the greedy sample from BOS


def run_demo_lm(args, ui: UI, folder: RunFolder) -> tuple[list[dict], str | None]:
    """The language-model part of the demo: stories260k quantized with DEMO_LM_METHOD at 2, 3 and 4
    bits, perplexity and one greedy sample before and after. Returns (rows, None), or ([], why)
    when the data directory is not there."""
    try:
        data = resolve_data_dir(None)
    except DataNotFoundError as e:
        return [], f"{DEMO_LM} skipped: {e}"
    ui.say(f"loading {DEMO_LM} (language model) ...")
    model, entry = get_model(DEMO_LM, data)
    tok = entry.extra["tokenizer"](data)
    ids, _ = entry.test(data)
    calib = entry.calib(DEMO_LM_CALIB, args.seed, data, seq_len=DEMO_LM_SEQ_LEN)

    def sample(m) -> str:
        return tok.decode(greedy_generate(m, [BOS_ID], DEMO_LM_NEW_TOKENS))

    float_res = perplexity(model, ids, DEMO_LM_SEQ_LEN, DEMO_LM_WINDOWS)
    rows = [{"model": DEMO_LM, "method": "float", "bits": 32, "perplexity": float_res.perplexity,
             "tokens": float_res.tokens, "seq_len": DEMO_LM_SEQ_LEN, "sample": sample(model)}]
    with ui.bar(len(DEMO_BITS), f"demo {DEMO_LM}", "run") as bar:
        for bits in DEMO_BITS:
            m = copy.deepcopy(model)
            cfg = make_config(DEMO_LM_METHOD, bits, "channel", args.seed)
            report = sq.quantize(m, cfg, calib=calib, progress=False)
            res = perplexity(m, ids, DEMO_LM_SEQ_LEN, DEMO_LM_WINDOWS)
            name = f"{DEMO_LM}-{DEMO_LM_METHOD}-w{bits}.safetensors"
            storage = save_and_measure(m, entry, folder.path / "models" / name,
                                       {"model": DEMO_LM, "method": DEMO_LM_METHOD, "bits": bits, "seed": args.seed})
            rows.append({"model": DEMO_LM, "method": DEMO_LM_METHOD, "bits": bits, "perplexity": res.perplexity,
                         "float_perplexity": float_res.perplexity, "tokens": res.tokens, "seq_len": DEMO_LM_SEQ_LEN,
                         "bits_per_weight": storage["bits_per_weight"], "size_vs_float": size_vs_float(storage),
                         "quant_seconds": report.seconds, "file": f"models/{name}", "sample": sample(m)})
            bar.update(1)
    mark_sweep(rows[1:], float_res.perplexity, score_key="perplexity", perplexity=True)
    return rows, None


def recommendation_text(runs: list[dict], rec: Recommendation, float_acc: float) -> str:
    """One line: the recommended run, its figures against float, and the rule."""
    if rec.index is None:
        return f"no recommendation ({rec.rule})"
    r = runs[rec.index]
    return (f"Recommended: {r['method']} at {r['bits']} bits: accuracy {r['accuracy']:.2f} % ({r['change']:+.2f} "
            f"points vs float {float_acc:.2f} %, ± {r['noise']:.2f} s.e.), {r['bits_per_weight']:.2f} bits per weight, "
            f"{r['size_vs_float']:.1f}× smaller than float32. Rule: {rec.rule}.")


def run_demo(args, argv: list[str], ui: UI, folder: RunFolder, t_total: float) -> tuple[dict, list[dict]]:
    """The work of ``specquant demo``: every file of the run folder written into ``folder.path``
    (one packed model per method and width under models/). Returns (metrics, rows of the summary table)."""
    methods = method_names()  # every registered method
    ui.say(f"training {DEMO_MODEL} on scikit-learn's digits ...")
    model, entry = get_model(DEMO_MODEL)
    x_test, y_test = entry.test(None)
    calib = entry.calib(args.calib, args.seed, None)
    float_acc = evaluate(model, x_test, y_test, ui, "float eval")
    ui.say(f"float model: {float_acc:.2f} % top-1 on {x_test.shape[0]} test images; quantizing with "
           f"{', '.join(methods)} at {', '.join(map(str, DEMO_BITS))} bits ...")

    runs, layer_rows = [], []
    float_model = folded_float(model, calib)
    kappas = None
    with ui.bar(len(methods) * len(DEMO_BITS), "demo", "run") as bar:
        for method in methods:
            for bits in DEMO_BITS:
                m = copy.deepcopy(model)
                cfg = make_config(method, bits, "channel", args.seed,
                                  args.redundancy if method == "frame" else None)
                report = sq.quantize(m, cfg, calib=calib, progress=False)
                acc = evaluate(m, x_test, y_test, UI(True))
                if kappas is None:
                    kappas = layer_kappas(float_model, [r.name for r in report.layers])
                name = f"{method}-w{bits}.safetensors"
                meta = {"model": DEMO_MODEL, "method": method, "bits": bits, "calib": args.calib, "seed": args.seed,
                        "redundancy": cfg.redundancy if method == "frame" else None}
                storage = save_and_measure(m, entry, folder.path / "models" / name, meta)
                layers = layer_records(report, kappas)
                runs.append({
                    "model": DEMO_MODEL, "method": method, "bits": bits,
                    "redundancy": cfg.redundancy if method == "frame" else None,
                    "levels": report.layers[0].levels if report.layers else None,
                    "avg_bits": report.avg_bits,
                    "bits_per_weight": storage["bits_per_weight"],
                    "bits_per_weight_payload": payload_bpw(storage),
                    "bits_per_weight_split": BitsPerWeight.from_storage(storage).to_dict(),
                    "size_vs_float": size_vs_float(storage),
                    "accuracy": acc, "float_accuracy": float_acc, "accuracy_drop": float_acc - acc,
                    "seed": args.seed, "n_calib": report.n_calib, "n_test": int(x_test.shape[0]),
                    "file": f"models/{name}", "file_bytes": storage["file_bytes"],
                    "quant_seconds": report.seconds, "peak_rss_mb": peak_rss_mb(), "layers": layers,
                })
                layer_rows.extend({"method": method, "run_bits": bits, **row} for row in layers)
                bar.update(1)

    rec = mark_sweep(runs, float_acc)
    lm_rows, lm_skipped = run_demo_lm(args, ui, folder)
    if lm_skipped:
        ui.say(lm_skipped)
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
        "n_calib": int(calib.shape[0]), "n_test": int(x_test.shape[0]), "methods": list(methods),
        "bits": list(DEMO_BITS), "frame_redundancy_setting": args.redundancy,
        "recommended": {**rec.to_dict(), "text": recommendation_text(runs, rec, float_acc)},
        "runs": runs, "frame_redundancy": sweeps, "language_model": lm_rows, "language_model_skipped": lm_skipped,
        "total_seconds": time.perf_counter() - t_total, "peak_rss_mb": peak_rss_mb(),
    }
    config_json = {
        **stamp, "command": "demo", "command_line": command_line(argv), "argv": argv, "model": DEMO_MODEL,
        "methods": list(methods), "bits": list(DEMO_BITS), "calib": args.calib, "seed": args.seed,
        "redundancy": args.redundancy, "granularity": "channel",
        "quant_configs": {m: config_dict(make_config(m, DEMO_BITS[0], "channel", args.seed,
                                                     args.redundancy if m == "frame" else None)) for m in methods},
        "versions": versions(), "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    summary = [{k: v for k, v in r.items() if k != "layers"} for r in runs]
    notes = [
        f"{DEMO_MODEL}: MLP {'-'.join(map(str, entry.extra.get('sizes', [])))} trained on scikit-learn's digits, "
        f"float accuracy {float_acc:.2f} % on {x_test.shape[0]} test images; {calib.shape[0]} calibration samples "
        f"from the training split; per-channel scales.",
        BPW_DEFINITION + "; bits_per_weight_payload leaves the file headers out. On a model this small the headers "
        "cost about one bit per weight. Δ vs float is in accuracy points, ± s.e. the binomial standard error of the "
        "accuracy on this test set: differences smaller than about twice it are noise. Pareto-optimal: no other row "
        "is both at least as small and at least as accurate.",
        f"frame: data-free Sigma-Delta over a harmonic tight frame with redundancy {args.redundancy}, so it stores "
        f"about {args.redundancy} × the code bits per weight.",
        lm_skipped or (f"{DEMO_LM}: the llama2.c TinyStories Llama, {DEMO_LM_METHOD} per-channel symmetric, "
                       f"{DEMO_LM_CALIB} calibration windows of {DEMO_LM_SEQ_LEN} tokens from the WikiText-2 "
                       f"validation text; perplexity on the first {DEMO_LM_WINDOWS} windows of the test text (out of "
                       f"the model's TinyStories domain); the sample is greedy decoding of {DEMO_LM_NEW_TOKENS} "
                       "tokens from BOS. The tied embeddings / lm_head stay float."),
    ]
    metrics["total_seconds"] = time.perf_counter() - t_total
    metrics["peak_rss_mb"] = peak_rss_mb()
    captions = {
        "accuracy_vs_bits.png": "top-1 accuracy against the file's bits per weight, one line per method; the dashed "
                                "line is float. The best methods sit top left: look for the one that stays near the "
                                "dashed line at the fewest bits.",
        "layers.png": f"at {mid} bits, each layer's relative output error per method (top, log scale) and its "
                      "condition number κ (bottom): the layer where the methods differ most is where the data-driven "
                      "ones earn their keep.",
        "frame_redundancy.png": "frame Sigma-Delta: weight error against redundancy, one line per code width, each "
                                "point labelled with the bits per weight it stores; look for where a curve flattens.",
    }
    headline = [metrics["recommended"]["text"]]
    lm_rec = next((r for r in lm_rows if r.get("recommended")), None)
    if lm_rec is not None:
        headline.append(f"{DEMO_LM}: recommended {lm_rec['method']} at {lm_rec['bits']} bits: perplexity "
                        f"{lm_rec['perplexity']:.2f} ({lm_rec['change']:+.2f} vs float "
                        f"{lm_rec['float_perplexity']:.2f}), file {lm_rec['size_vs_float']:.1f}× smaller than "
                        "float32. Rule: smallest model within 5 % of float perplexity.")
    rf.write_run_folder(folder.path, config=config_json, metrics=metrics, layers=layer_rows, plots=plots,
                        summary=summary, title=f"specquant demo: {DEMO_MODEL}, every method at 2, 3 and 4 bits",
                        notes=notes, sections=[(f"Language model: {DEMO_LM}", lm_rows)] if lm_rows else [],
                        headline=headline, captions=captions)
    return metrics, summary


def _mark(row: dict) -> str:
    """★ for the recommended row, ◆ for a Pareto-optimal one."""
    return ("★" if row.get("recommended") else "") + ("◆" if row.get("pareto") else "")


def cmd_demo(args, argv: list[str]) -> int:
    ui = UI(args.quiet)
    t_total = time.perf_counter()
    out = args.out or os.path.join("runs", "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    with staged_run_folder(out, args.overwrite) as folder:
        metrics, summary = run_demo(args, argv, ui, folder, t_total)
    metrics["total_seconds"] = time.perf_counter() - t_total
    out = folder.target

    ui.say("")
    marked = [dict(r, mark=_mark(r), change=f"{r['change']:+.2f}", noise=f"{r['noise']:.2f}") for r in summary]
    ui.say(format_table(marked, [("mark", ""), ("method", "method"), ("bits", "bits"), ("accuracy", "accuracy %"),
                                 ("change", "Δ vs float"), ("noise", "± s.e."),
                                 ("bits_per_weight", "bits/weight (file)"), ("size_vs_float", "× smaller"),
                                 ("quant_seconds", "seconds")]))
    ui.say("★ recommended, ◆ Pareto-optimal (no other row at least as small and as accurate); ± s.e.: binomial "
           "standard error of the accuracy.")
    ui.say(metrics["recommended"]["text"])
    ui.say(f"\nfloat accuracy {metrics['float_accuracy']:.2f} %; frame uses redundancy {args.redundancy} "
           f"(bits = bits per code).")
    if metrics["language_model"]:
        ui.say("")
        lm = [dict(r, mark=_mark(r), change=f"{r['change']:+.2f}" if "change" in r else None)
              for r in metrics["language_model"]]
        ui.say(format_table(lm, [("mark", ""), ("model", "model"), ("method", "method"), ("bits", "bits"),
                                 ("perplexity", "perplexity"), ("change", "Δ vs float"),
                                 ("bits_per_weight", "bits/weight (file)"), ("size_vs_float", "× smaller"),
                                 ("quant_seconds", "seconds")]))
        for r in metrics["language_model"]:
            ui.say(f"  {r['method']} {r['bits']}-bit sample: {r['sample'][:100]!r}")
    ui.say(f"Total {metrics['total_seconds']:.1f} s.")
    ui.say(f"run folder: {out}  (open {out / 'index.html'})")
    if args.json:
        emit_json(metrics)
    return 0
