"""``specquant quantize``: quantize a zoo model (uniform widths or a mixed-precision budget),
evaluate it against the float model, measure its true storage, and write the run folder."""
from __future__ import annotations

import dataclasses
import datetime
import time

import specquant as sq
from specquant.algorithms.base import ModuleSettings, split_method
from specquant.cli.common import (
    FRAME_SWEEP,
    UI,
    CLIError,
    EtaProgress,
    check_data_dir,
    command_line,
    config_dict,
    emit_json,
    entry_metric,
    evaluate,
    folded_float,
    layer_records,
    lm_perplexity,
    load_entry_model,
    load_test_set,
    make_config,
    measure_storage,
    payload_bpw,
    peak_rss_mb,
    resolve_device,
    resolve_entry,
    staged_run_folder,
    versions,
)
from specquant.cli.distributed import run_ranks, wants_ranks
from specquant.cli.outofcore import check_out_of_core, cmd_quantize_out_of_core
from specquant.diagnostics.sweeps import frame_redundancy_sweep, layer_kappas
from specquant.engine.distributed import Dist
from specquant.mixed import allocate
from specquant.report import run_folder as rf
from specquant.report.decide import BPW_DEFINITION, BitsPerWeight, Headline, budget_note, size_vs_float
from specquant.report.run_folder import RunFolder
from specquant.report.table import format_table

LIMIT_SAMPLING = "stratified by class, seeded by --seed"  # how --limit picks test samples
POLICIES = ("sensitivity", "spectral", "spectral-knapsack")  # specquant.mixed.POLICIES
# --gguf TYPE -> (bits, symmetric, scale dtype); always groups of 32 inputs
GGUF_GRIDS = {"q4_0": (4, True, "float16"), "q4_1": (4, False, "float16-q4_1"), "q8_0": (8, True, "float16")}

LAYER_TABLE = (("name", "layer"), ("type", "type"), ("shape", "shape"), ("bits", "bits"), ("levels", "levels"),
               ("bits_per_weight", "bits/w"), ("weight_sqnr_db", "SQNR dB"), ("rel_output_error", "rel. out err"),
               ("kappa", "kappa"), ("seconds", "s"))


def base_method(args) -> str:
    """The method that rounds: "gptq" for ``--method awq+gptq`` (AWQ scales, then GPTQ)."""
    return split_method(args.method)[0]


def quantize_config(args):
    """Every check of ``specquant quantize``'s arguments, before any data is read or any model
    loaded; returns (the algorithm config, the model entry)."""
    if args.avg_bits is not None and args.bits is not None:
        raise CLIError("quantize: give either --bits (uniform) or --avg-bits (mixed precision), not both")
    entry = resolve_entry(args.model, args)
    if getattr(args, "gguf", None) is not None:
        if getattr(args, "grid", "int") != "int":
            raise CLIError(f"quantize: --gguf {args.gguf} holds integer codes; --grid {args.grid} contradicts it")
        _gguf_args(args)
    if getattr(args, "grid", "int") != "int":
        _fp8_args(args)
    if args.avg_bits is None and args.bits is None:
        raise CLIError("quantize: give --bits B (uniform) or --avg-bits A with --policy (mixed precision)")
    if args.avg_bits is not None and args.policy is None:
        raise CLIError("quantize: --avg-bits needs --policy (sensitivity, spectral or spectral-knapsack)")
    if args.policy is not None and args.avg_bits is None:
        raise CLIError("quantize: --policy needs --avg-bits A")
    if args.redundancy is not None and base_method(args) != "frame":
        raise CLIError("quantize: --redundancy applies to --method frame only")
    if args.per_channel_bits and args.policy != "sensitivity":
        raise CLIError("quantize: --per-channel-bits needs --avg-bits A --policy sensitivity")
    if args.per_channel_bits and (base_method(args) == "frame" or args.granularity != "channel"):
        raise CLIError("quantize: --per-channel-bits needs per-channel scales (--granularity channel) and a "
                       "uniform-grid method (rtn, gpfq, spfq, gptq, qronos)")
    mixed = args.avg_bits is not None
    scale_dtype = GGUF_GRIDS[args.gguf][2] if getattr(args, "gguf", None) is not None else "float32"
    base_bits = args.bits if not mixed else max(1, min(8, round(args.avg_bits)))
    config = make_config(args.method, base_bits, args.granularity, args.seed, args.redundancy,
                         symmetric=not args.asymmetric, protect=args.protect or (), scale_dtype=scale_dtype)
    if getattr(args, "grid", "int") != "int":
        config = dataclasses.replace(config, grid=args.grid)
    check_data_dir(entry, args.data_dir)
    resolve_device(args.device)
    if entry.kind == "lm" and (args.metric is not None or args.limit is not None):
        raise CLIError("quantize: --metric and --limit are for classifiers; language models are scored by perplexity "
                       "(use --eval-windows N for quick runs)")
    return _act_config(args, config), entry


def _act_config(args, config):
    """``--act-bits A [--act-calibrator C] [--act-granularity G]`` and ``--smoothquant ALPHA``: the config
    with input quantizers on every quantized layer and the SmoothQuant pre-step."""
    alpha = getattr(args, "smoothquant", None)
    if alpha is not None:
        config = dataclasses.replace(config, smoothquant=alpha)
    act_bits, calibrator = getattr(args, "act_bits", None), getattr(args, "act_calibrator", None)
    act_grid = getattr(args, "act_grid", "int") or "int"
    if act_grid != "int":
        if act_bits not in (None, 8):
            raise CLIError(f"quantize: --act-grid {act_grid} is 8-bit; --act-bits {act_bits} contradicts it")
        act_bits = 8
    granularity = getattr(args, "act_granularity", None)
    if act_bits is None:
        if calibrator is not None:
            raise CLIError("quantize: --act-calibrator needs --act-bits A")
        if granularity is not None:
            raise CLIError("quantize: --act-granularity needs --act-bits A")
        return config
    return dataclasses.replace(config, act_bits=act_bits, act_calibrator=calibrator or "mse", act_grid=act_grid,
                               act_granularity=granularity or "tensor")


def act_fields(config) -> dict:
    """{"act_bits", "act_calibrator", "act_granularity"} of a run with activation quantization, plus
    "grid" / "act_grid" when FP8 and {"smoothquant": α} with SmoothQuant, else {} (older JSON unchanged)."""
    d = {"grid": config.grid} if getattr(config, "grid", "int") != "int" else {}
    if getattr(config, "smoothquant", None) is not None:
        d["smoothquant"] = config.smoothquant
    if getattr(config, "act_bits", None) is None:
        return d
    act_grid = {"act_grid": config.act_grid} if getattr(config, "act_grid", "int") != "int" else {}
    return {**d, "act_bits": config.act_bits, "act_calibrator": config.act_calibrator,
            "act_granularity": config.act_granularity, **act_grid}


def _fp8_args(args) -> None:
    """``--grid fp8-e4m3|fp8-e5m2``: 8-bit float codes; widths and options that contradict it are refused."""
    if args.bits is not None and args.bits != 8:
        raise CLIError(f"quantize: --grid {args.grid} stores 8-bit codes; --bits {args.bits} contradicts it")
    if args.asymmetric:
        raise CLIError(f"quantize: --grid {args.grid} is symmetric (zero point 0); drop --asymmetric")
    if args.avg_bits is not None or base_method(args) == "frame":
        raise CLIError(f"quantize: --grid {args.grid} needs one 8-bit grid (not --avg-bits, not --method frame)")
    for pattern, b in args.protect or ():
        if b is not None and b != 8:
            raise CLIError(f"quantize: --protect {pattern}={b}: with --grid {args.grid} a protected layer is 8 bits "
                           "or float")
    args.bits = 8


def _gguf_args(args) -> None:
    """``--gguf TYPE``: the grid GGUF's TYPE blocks hold (bits, group:32, symmetric or not);
    contradicting arguments are refused."""
    bits, symmetric, _ = GGUF_GRIDS[args.gguf]
    if args.bits is not None and args.bits != bits:
        raise CLIError(f"quantize: --gguf {args.gguf} is {bits}-bit; --bits {args.bits} contradicts it")
    if args.granularity not in ("channel", "group:32"):
        raise CLIError(f"quantize: --gguf {args.gguf} uses groups of 32; --granularity {args.granularity} "
                       "contradicts it")
    if args.asymmetric and symmetric:
        raise CLIError(f"quantize: --gguf {args.gguf} is a symmetric grid; drop --asymmetric")
    if args.avg_bits is not None or base_method(args) == "frame":
        raise CLIError("quantize: --gguf needs uniform codes (not --avg-bits, not --method frame)")
    allowed = {4, 8} if symmetric else {4}
    for pattern, b in args.protect or ():
        if b is not None and b not in allowed:
            raise CLIError(f"quantize: --protect {pattern}={b}: with --gguf {args.gguf} a protected layer is "
                           f"{' or '.join(map(str, sorted(allowed)))} bits or float")
    args.bits, args.granularity, args.asymmetric = bits, "group:32", not symmetric


def _scorer(args, entry, ui: UI):
    """(score(model, desc) -> dict, calibration inputs) for the entry's kind: top-1 accuracy on the
    test images for classifiers; for language models perplexity on the WikiText-2 test text and
    calibration windows of --seq-len tokens from the validation text."""
    if entry.kind == "lm":
        seq_len = args.seq_len or entry.extra["seq_len"]
        ids, _ = entry.test(args.data_dir)
        calib = entry.calib(args.calib, args.seed, args.data_dir, seq_len=seq_len)

        def score_lm(model, desc: str) -> dict:
            r = lm_perplexity(model, ids, seq_len, args.eval_windows, ui, desc).to_dict()
            r["summary"] = f"perplexity {r['perplexity']:.3f} on {r['tokens']} tokens ({r['windows']} × {seq_len})"
            return r
        return score_lm, calib
    x_test, y_test = load_test_set(entry, args.data_dir, args.limit, args.seed)
    try:
        calib = entry.calib(args.calib, args.seed, args.data_dir)
    except ValueError as e:
        raise CLIError(str(e)) from None
    metric = entry_metric(entry, args)

    def score_classifier(model, desc: str) -> dict:
        v = evaluate(model, x_test, y_test, ui, desc, metric=metric)
        if metric is not None:
            return {"metric": v, "metric_name": metric[0], "n_test": int(x_test.shape[0]),
                    "summary": f"{metric[0]} = {v:.6g} on {x_test.shape[0]} test samples"}
        return {"accuracy": v, "n_test": int(x_test.shape[0]),
                "summary": f"{v:.2f} % top-1 on {x_test.shape[0]} test samples"}
    return score_classifier, calib


def _score_keys(float_score: dict, quant_score: dict) -> dict:
    """The metrics keys of the two scores (accuracy for classifiers, perplexity for language models)."""
    if "perplexity" in quant_score:
        keys = {"perplexity": quant_score["perplexity"], "float_perplexity": float_score["perplexity"]}
        keys.update({k: quant_score[k] for k in ("tokens", "predicted_tokens", "windows", "seq_len")})
        return keys
    if "metric" in quant_score:
        return {"metric_name": quant_score["metric_name"], "metric": quant_score["metric"],
                "float_metric": float_score["metric"], "metric_change": quant_score["metric"] - float_score["metric"],
                "n_test": quant_score["n_test"]}
    return {"accuracy": quant_score["accuracy"], "float_accuracy": float_score["accuracy"],
            "accuracy_drop": float_score["accuracy"] - quant_score["accuracy"], "n_test": quant_score["n_test"]}


def run_quantize(args, argv: list[str], ui: UI, config, folder: RunFolder | None = None, entry=None,
                 dist: Dist | None = None, float_cache: dict | None = None) -> dict:
    """The work of ``specquant quantize`` with the checked ``config`` (see :func:`quantize_config`);
    returns the metrics. ``float_cache`` (a dict kept across runs of one model, as ``specquant sweep``
    does): the float model's score by seed, measured once (the seed draws a --limit test subset).
    With a ``folder`` (:func:`staged_run_folder`), writes every file of the run
    folder into its staging folder, ``config.json`` and ``metrics.json`` stamped with its
    ``run_id`` and the model's SHA-256.  With ``dist`` (a rank of several, cli/distributed.py) every
    rank quantizes its shard of the calibration batches; only rank 0 scores and writes (others
    return {})."""
    t_total = time.perf_counter()
    mixed = args.avg_bits is not None
    ui.say(f"loading {args.model} ...")
    model, entry = load_entry_model(args.model, args.data_dir, args, entry)
    device = resolve_device(args.device)
    model.to(device)
    score, calib = _scorer(args, entry, ui)
    calib = calib.to(device)
    helper = dist is not None and dist.rank != 0  # a rank that only quantizes its shard
    t0 = time.perf_counter()
    if helper:
        float_score = {}
    elif float_cache is not None and args.seed in float_cache:
        float_score = float_cache[args.seed]
    else:
        float_score = score(model, "float eval")
        if float_cache is not None:
            float_cache[args.seed] = float_score
    float_eval_s = time.perf_counter() - t0
    if not helper:
        ui.say(f"float model: {float_score['summary']}")

    allocation = None
    if mixed:
        per = "channel" if args.per_channel_bits else "layer"
        ui.say(f"allocating bits per {per} ({args.policy} policy, {args.avg_bits} bits on average) ...")
        with EtaProgress(ui, "sensitivity pass", "quantization") as progress:
            allocation = allocate(model, calib, args.avg_bits, policy=args.policy, method_config=config,
                                  granularity=per, progress=progress, dist=dist)
        config = allocation.apply(config)
    if getattr(args, "gguf", None) is not None:
        from specquant.export.gguf import gguf_float_layers

        for name, why in gguf_float_layers(model).items():  # exact names win over --protect patterns
            config.modules[name] = ModuleSettings(skip=True)
            ui.say(f"--gguf: {name} stays in float ({why})")
    float_model = folded_float(model, calib) if not helper else None
    ui.say(f"quantizing with {args.method} "
           + (f"at {args.bits} bits" if not mixed else f"at {args.avg_bits} average bits ({args.policy})")
           + f", {calib.shape[0]} calibration samples ...")
    report = sq.quantize(model, config, calib=calib, progress=ui.progress, dist=dist,
                         batch_size=getattr(args, "calib_batch", 128))
    ranks = {} if dist is None else {"nproc": dist.world, "comm_bytes": dist.sum_int(dist.received_bytes)}
    if helper:
        return {}
    t0 = time.perf_counter()
    quant_score = score(model, "quantized eval")
    eval_s = time.perf_counter() - t0

    kappas = layer_kappas(float_model, [r.name for r in report.layers])
    layers = layer_records(report, kappas)
    meta = {"model": args.model, "method": args.method, "bits": args.bits, "avg_bits": args.avg_bits,
            "policy": args.policy, "granularity": args.granularity, "calib": args.calib, "seed": args.seed,
            "redundancy": getattr(config, "redundancy", None) if base_method(args) == "frame" else None,
            "symmetric": not args.asymmetric,
            "protect": [f"{p}={'float' if b is None else b}" for p, b in args.protect or ()],
            "gguf": getattr(args, "gguf", None), **act_fields(config)}
    model.cpu()  # the packed file is written from the CPU
    storage = measure_storage(model, entry, folder, meta)
    bpw = BitsPerWeight.from_storage(storage)
    head = headline_of(float_score, quant_score, storage, report.seconds)

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
        if bpw is not None:
            metrics["budget_note"] = budget_note(args.avg_bits, report.avg_bits, bpw)
    if base_method(args) == "frame":
        metrics["redundancy"] = config.redundancy
    metrics.update({
        "granularity": args.granularity,
        "symmetric": not args.asymmetric,
        **act_fields(config),
        **({"gguf": args.gguf} if getattr(args, "gguf", None) else {}),
        "bits_per_weight": storage["bits_per_weight"],
        "bits_per_weight_payload": payload_bpw(storage),
        "bits_per_weight_split": bpw.to_dict() if bpw is not None else None,  # code + scale + overhead = total
        "size_vs_float": size_vs_float(storage),
        "storage": storage,
        "headline": head.to_dict(),
        **_score_keys(float_score, quant_score),
        "n_calib": report.n_calib,
        "num_weights": report.num_weights,
        "seed": args.seed,
        "quant_seconds": report.seconds,
        "eval_seconds": eval_s,
        "float_eval_seconds": float_eval_s,
        "total_seconds": time.perf_counter() - t_total,
        "peak_rss_mb": peak_rss_mb(),
        **ranks,  # --nproc N: the number of ranks and the payload bytes they received in all
        "skipped": [dataclasses.asdict(s) for s in report.skipped],
        "folded_bn": [dataclasses.asdict(f) for f in report.folded_bn],
        **({"awq": [dataclasses.asdict(r) for r in report.awq]} if report.awq else {}),  # --method awq / awq+NAME
        **({"smoothquant_groups": [dataclasses.asdict(r) for r in report.smoothquant]}
           if report.smoothquant else {}),  # --smoothquant ALPHA
        "layers": layers,
    })

    if folder is not None:
        plots = {"layers.png": rf.plot_layers(
            [r["name"] for r in layers], {args.method: [r["rel_output_error"] for r in layers]},
            [r["kappa"] for r in layers], title=f"{args.model} {args.method}: per-layer relative output error and κ")}
        captions = {"layers.png": "top: each layer's relative output error ‖XW − X̃Ŵ‖/‖XW‖ (log scale), bottom: "
                                  "its condition number κ(W). Look for the layers that stand out: they cost the "
                                  "most accuracy and are the first to protect (--protect NAME=8)."}
        notes = [BPW_DEFINITION + "."]
        if mixed:
            plots["widths.png"] = _plot_allocation(allocation, args.avg_bits, report.avg_bits,
                                                   bpw.total if bpw is not None else None,
                                                   title=f"{args.model}: width chosen per {per}")
            captions["widths.png"] = ("bars: the code width given to each layer (whiskers: the range over its "
                                      "output channels with --per-channel-bits); lines: the budget, the code bits "
                                      "achieved and the file's bits per weight. The layers the sensitivity pass "
                                      "found fragile get the widest codes.")
        if base_method(args) == "frame":
            sweep = frame_redundancy_sweep(float_model, config.bits, FRAME_SWEEP, order=config.order,
                                           frame=config.frame, step=config.step, dim=config.dim,
                                           granularity=config.granularity, seed=config.seed)
            metrics["frame_redundancy"] = sweep
            plots["frame_redundancy.png"] = rf.plot_frame_redundancy([sweep])
            captions["frame_redundancy.png"] = ("data-free weight error ‖W − Ŵ‖/‖W‖ of the float (BN-folded) "
                                                "weights for each redundancy at the run's code width; each point is "
                                                "labelled with the bits per weight it stores. Look for where the "
                                                "curve flattens: more redundancy beyond it costs bits for little.")
        metrics["peak_rss_mb"] = peak_rss_mb()
        stamp = folder.stamp()  # run_id and model_sha256, in both files
        metrics.update(stamp)
        config_json = {
            **stamp, "command": "quantize", "command_line": command_line(argv), "argv": argv,
            "model": args.model, "method": args.method, "bits": args.bits, "avg_bits": args.avg_bits,
            "policy": args.policy, "granularity": args.granularity, "calib": args.calib, "seed": args.seed,
            "redundancy": args.redundancy, "limit": args.limit, "limit_sampling": LIMIT_SAMPLING,
            "data_dir": args.data_dir, "device": str(device), "weights": args.weights, "calib_data": args.calib_data,
            "eval_data": args.eval_data, "metric": args.metric, **act_fields(config),
            "seq_len": float_score.get("seq_len"), "eval_windows": args.eval_windows,
            "quant_config": config_dict(config), "versions": versions(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        title = f"specquant: {args.model} · {args.method} · " + (
            f"{args.bits} bits" if not mixed else f"{args.avg_bits} average bits ({args.policy})")
        lines = [head.text()] + ([bpw.text()] if bpw is not None else []) + (
            [metrics["budget_note"]] if "budget_note" in metrics else [])
        summary = [{**metrics, "change": head.change, "noise": head.noise}]
        rf.write_run_folder(folder.path, config=config_json, metrics=metrics, layers=layers, plots=plots,
                            title=title, notes=notes, headline=lines, captions=captions, summary=summary)
    return metrics


def headline_of(float_score: dict, quant_score: dict, storage: dict, seconds: float) -> Headline:
    """The headline of a run: score change against float (with its noise), size against float, time."""
    if "perplexity" in quant_score:
        name, key, n = "perplexity", "perplexity", quant_score.get("predicted_tokens")
    elif "metric" in quant_score:
        name, key, n = quant_score["metric_name"], "metric", quant_score["n_test"]
    else:
        name, key, n = "accuracy", "accuracy", quant_score["n_test"]
    return Headline(name, float_score[key], quant_score[key], n, size_vs_float(storage), seconds)


def _plot_allocation(allocation, budget: float, code_bits: float, file_bits: float | None, title: str) -> bytes:
    """The widths an allocation chose, per layer (mean, min and max over its rows)."""
    names, mean, low, high = [], [], [], []
    for a in allocation.layers:
        rows = a.row_bits or (a.bits,)
        names.append(a.name)
        mean.append(sum(rows) / len(rows))
        low.append(min(rows))
        high.append(max(rows))
    return rf.plot_widths(names, mean, low, high, budget, code_bits, file_bits, title=title)


def cmd_quantize(args, argv: list[str]) -> int:
    config, entry = quantize_config(args)
    limit = check_out_of_core(args, entry)
    if limit is not None:  # --max-memory: a Hugging Face folder read block by block (cli/outofcore.py)
        if getattr(args, "nproc", 1) > 1:
            raise CLIError("quantize: --max-memory and --nproc cannot be combined yet; give one of them")
        return cmd_quantize_out_of_core(args, argv, config, entry, limit)
    if wants_ranks(args):  # --nproc N, or a rank started by it or by torchrun
        return run_ranks(args, argv, lambda dist: _quantize_command(args, argv, config, entry, dist))
    return _quantize_command(args, argv, config, entry)


def _quantize_command(args, argv: list[str], config, entry, dist: Dist | None = None) -> int:
    helper = dist is not None and dist.rank != 0  # ranks 1.. neither write nor print
    ui = UI(args.quiet or helper)
    with staged_run_folder(None if helper else args.out, args.overwrite and not helper) as folder:
        metrics = run_quantize(args, argv, ui, config, folder, entry, dist)
    if helper:
        return 0
    out = folder.target if folder is not None else None
    bits = metrics["bits"] if metrics["bits"] is not None else f"avg {metrics['avg_bits']:.3g}"
    ui.say("")
    ui.say(format_table(metrics["layers"], LAYER_TABLE))
    ui.say("")
    cols = [("model", "model"), ("method", "method"), ("bits", "bits"), ("bits_per_weight", "bits/weight (file)"),
            ("float_accuracy", "float %"), ("accuracy", "accuracy %"), ("float_perplexity", "float ppl"),
            ("perplexity", "perplexity"), ("metric_name", "metric"), ("float_metric", "float"), ("metric", "value"),
            ("size_vs_float", "× smaller"), ("quant_seconds", "quant s"), ("peak_rss_mb", "peak RSS MB")]
    ui.say(format_table([dict(metrics, bits=bits)], [c for c in cols if c[0] in metrics]))
    ui.say("")
    ui.say(Headline.from_dict(metrics["headline"]).text())
    if metrics.get("bits_per_weight_split"):
        ui.say(BitsPerWeight(**{k: metrics["bits_per_weight_split"][k] for k in ("code", "scale", "overhead")}).text())
    if metrics.get("budget_note"):
        ui.say(metrics["budget_note"])
    if out is not None:
        ui.say(f"\nrun folder: {out}  (open {out / 'index.html'})")
    if args.json:
        emit_json(metrics)
    return 0
