"""specquant against Brevitas on a causal language model: weight-only, same grid, same data.

Every ``nn.Linear`` inside the decoder blocks is quantized (q/k/v/o and gate/up/down); the
embeddings and the lm_head (tied to them) stay float; activations stay float.  Both tools see the
same calibration windows and are scored by the same perplexity code
(``specquant.eval.perplexity.perplexity``).  Each run happens in a fresh process (spawn) so that
its peak RSS is its own; the float model is scored once, in its own process.

Protocol (the defaults)::

    python benchmarks/llm_vs_peers.py                       # smollm2-135m, the whole protocol
    python benchmarks/llm_vs_peers.py --smoke               # tiniest setting on stories260k
    python benchmarks/llm_vs_peers.py --model stories260k --calib 8 --seq-len 128 --eval-windows 8 \\
        --grids w4c w3g4a --runs specquant:gptq brevitas:gptq --repeats 3

  model ``smollm2-135m``; calibration: 64 windows of 512 tokens at seeded offsets (seed 0) of the
  WikiText-2 validation text (``entry.calib(64, 0, data_dir, seq_len=512)``); perplexity on the
  first 40 non-overlapping windows of 512 tokens of the WikiText-2 test text (``--full-eval``: also
  the whole test text); grids ``w4g128a w3g128a w2g64a w4c``.

Grids (``--grids``): ``wBgGa`` = B bits, groups of G inputs along the input dimension, each with
its own scale and integer zero point (asymmetric, 2^B levels, range min/max of the group with 0
included); ``wBc`` = B bits per output channel, symmetric narrow (2^B - 1 levels, max-abs);
``wBca`` = per output channel asymmetric.

specquant (``--runs specquant:M``): M is any registered method (``rtn``, ``gptq``, ``gpfq``,
``spfq``, ``qronos`` once registered, ...), ``rtn-minmax`` (RTN with min/max ranges: the very grid
Brevitas' RTN uses, a cross-check), ``rtn-output-mse`` (RTN whose per-group clipping is chosen
on the calibration data's output error), ``M@RULE`` (method M with the step rule RULE, e.g.
``qronos@minmax``), or ``awq+M`` (AWQ scales, then M's rounding), built by name
through ``specquant.algorithms.make_config("awq+M")`` or, failing that, as M's config with
``awq=True``.  A method this specquant does not have is skipped with the reason printed.  Each
method keeps its own default step rule (RTN: MSE-clipped ranges; GPTQ/GPFQ/SPFQ: output-MSE).  A
data-free run (RTN on min/max or weight-MSE ranges) is given no calibration batches (record key
``calibration_used``), so that its seconds are the rounding's, as Brevitas' RTN's are: with batches
the engine would stream every layer's statistics for the report's output errors alone.
A grid specquant refuses (a group size that does not divide some layer's input dimension, before
uneven groups land) is skipped for specquant with the reason printed; Brevitas still runs it.

Brevitas 0.13.4 (``--runs brevitas:M``, M in rtn gptq gpfq qronos): each target ``nn.Linear`` is
replaced by a ``brevitas.nn.QuantLinear`` with an integer weight quantizer on the same grid:

* ``wBgGa``: ``brevitas.quant.shifted_scaled_int.ShiftedUint8WeightGroupQuantFloat`` (what the
  Brevitas LLM example picks for int/per_group/asym) with ``bit_width=B, group_size=G``, integer
  zero point (``quantize_zero_point=True``, its default);
* ``wBc``: ``brevitas.quant.scaled_int.Int8WeightPerChannelFloat`` with ``bit_width=B`` (narrow
  range, max-abs scale);  ``wBca``: ``ShiftedUint8WeightPerChannelFloat``.

  In every case ``scaling_impl_type=PARAMETER_FROM_STATS`` and, for the asymmetric grids,
  ``zero_point_impl=ParameterFromStatsFromParameterZeroPoint`` (the LLM example's defaults for
  ``--weight-param-method stats``): scale and zero point are computed once from the *full* float
  weight by one forward pass and then held.  Brevitas' default runtime-stats scale (and zero
  point) is recomputed from whatever tensor it is given; GPTQ/GPFQ/Qronos quantize one column
  slice at a time, so each slice would get its own range and the algorithms would silently become
  round-to-nearest.  The script checks this per run: the scales and zero points after GPxQ must
  equal those before, and the dequantized weights must differ from RTN's on the same grid
  (asserted; the share of changed weights is in the JSON as ``changed_vs_rtn``).

  The grids match specquant's except in one corner: Brevitas' asymmetric range is
  [min(w_min, 0), w_max] (``AbsMinMax`` clamps only the minimum to 0), so a group whose weights
  are all negative gets a grid whose top is w_max < 0, not 0, and a zero point that can exceed
  2^B - 1; specquant's range always contains 0.  On smollm2-135m no group of 128 or 64 inputs is
  all negative (counted), so the grids are identical there; with tiny groups (stories260k, G = 4)
  they are not (``specquant:rtn-minmax`` vs ``brevitas:rtn`` shows it).  Per-channel symmetric
  RTN weights agree bit for bit up to rounding ties (1 weight of 0.23 M differed on stories260k at W3).

  Groups that do not divide the input dimension (smollm2's 576 = 4 x 128 + 64 inputs with G = 128;
  stories260k's 64 and 172 with G = 32 or 128): Brevitas pads each row with zeros to a multiple of
  G (``brevitas.utils.torch_utils.padding_to_multiple``, called by the group view of the weight)
  and cuts the padding off again; the last group is a short one with its own scale and zero point.
  The zero padding does not change that group's min/max range (its maximum can only rise to 0,
  which specquant's range contains anyway): the grid is that of a short last group (checked:
  Brevitas' RTN weights equal a hand-written min/max rounding with a short last group, bit for
  bit, on stories260k's 172-input layers at G = 128).

  Algorithms: ``gptq`` = ``brevitas.graph.gptq.gptq_mode`` with ``act_order=True``; ``gpfq`` =
  ``brevitas.graph.gpfq.gpfq_mode`` with ``act_order=True``; ``qronos`` = ``gpfq_mode`` with
  ``algorithm_impl=partial(brevitas.graph.qronos.Qronos, alpha=1e-6)`` (the LLM example's
  ``apply_qronos``), ``act_order=True``; all with ``use_quant_activations=False`` (weight-only).
  They run as documented, on the whole model: one pass over the calibration batches per layer
  group, each pass stopped (Brevitas' StopFwdException) at the layer it collects; q/k/v and
  gate/up, which read the same input, are given as ``group_of_parallel_layers`` (a public argument
  of the modes; same result, fewer passes; ``--brevitas-sequential`` turns it off).  Brevitas has
  no block-wise option in the library itself: the LLM example's block-wise driver
  (``brevitas_examples.llm.llm_quant.gpxq.block_optimization``, ``--gpxq-block-name``) imports
  ``accelerate`` (not installed here) and moves every cached input to ``'cuda'``, so it cannot run
  on this CPU machine.  The whole-model passes cost about (layer groups) x (blocks) / 2 block
  forwards per calibration window instead of a few per block.  With a group-wise quantizer
  Brevitas also re-quantizes the whole weight for every column it rounds (its group-wise
  quantizers cannot quantize a column slice): on smollm2-135m one GPTQ run at w4g64a took 853 s
  with only 2 calibration windows of 64 tokens (forward passes negligible there; specquant GPTQ
  342 s, both on a shared 2-core machine, 1 thread).  Times are reported as they are.

Timing: ``quant_seconds`` is the quantization alone (specquant: ``quantize``; Brevitas: module
replacement, the scale-initialising forward and GPxQ; the RTN snapshot and checks taken for the
assertion are not counted).  ``peak_rss_mb`` is the process's peak after quantizing (model,
calibration and test tokens loaded, no evaluation yet), ``peak_rss_eval_mb`` after evaluating.
Perplexity is deterministic at a fixed thread count; times and RSS are medians over ``--repeats``
runs, interleaved across tools (A B A B ...).  The JSON holds the protocol, the thread counts
(``--threads``, ``OMP_NUM_THREADS``, torch's count inside each job), the float perplexity, one
record per run and the skipped runs with their reasons.

Merging: ``--table A.json B.json ... [--out merged.json]`` runs nothing; it merges the runs of
JSONs made with one protocol (same settings, Brevitas and torch versions, float perplexity; a run
in two files must agree), prints every run with its file, and per grid the goals: specquant's best
against Brevitas' best (undecided until all four Brevitas methods ran), and against Brevitas GPTQ
the gap to float, the quantization time and the peak RSS as ratios.  The protocol's JSONs are kept
in ``benchmarks/results/`` so that the table can grow across sessions.

Long protocols (one Brevitas GPTQ run at 64 windows takes hours on one core): with ``--repeats 1``
every finished run is written to the JSON at once, and ``--resume`` keeps the finished runs of an
earlier JSON made with the same protocol, library versions and float perplexity, running only the
missing (grid, tool, method) jobs; runs of that file not asked for this time stay in it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GRIDS = ["w4g128a", "w3g128a", "w2g64a", "w4c"]
DEFAULT_RUNS = [
    "specquant:rtn", "specquant:gptq", "specquant:gpfq", "specquant:spfq", "specquant:qronos",
    "specquant:awq+gptq", "specquant:awq+gpfq", "specquant:awq+qronos",
    "brevitas:rtn", "brevitas:gptq", "brevitas:gpfq", "brevitas:qronos",
]
BREVITAS_METHODS = ("rtn", "gptq", "gpfq", "qronos")
SMOKE = {"model": "stories260k", "calib": 4, "seq_len": 64, "eval_windows": 4, "grids": ["w4g32a", "w4c"],
         "runs": ["specquant:rtn", "specquant:gptq", "specquant:gpfq", "brevitas:rtn", "brevitas:gptq",
                  "brevitas:gpfq"]}
MIN_CHANGED = 0.01  # Brevitas GPxQ must move at least this share of the weights off RTN's codes


@dataclass(frozen=True)
class Grid:
    name: str
    bits: int
    granularity: str  # specquant's label: "channel" or "group:G"
    group_size: int | None
    symmetric: bool

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1 if self.symmetric else 1 << self.bits


def parse_grid(name: str) -> Grid:
    m = re.fullmatch(r"w([1-8])g(\d+)a", name)
    if m:
        g = int(m.group(2))
        if g < 1:
            raise ValueError(f"grid {name!r}: the group size must be positive")
        return Grid(name, int(m.group(1)), f"group:{g}", g, symmetric=False)
    m = re.fullmatch(r"w([2-8])c(a?)", name)
    if m:
        return Grid(name, int(m.group(1)), "channel", None, symmetric=not m.group(2))
    raise ValueError(f"unknown grid {name!r}: expected wBgGa (group G, asymmetric), wBc (per channel, "
                     "symmetric narrow) or wBca (per channel, asymmetric), e.g. w4g128a w4c")


class Unavailable(Exception):
    """A run this installation cannot do (a method not registered, a grid refused): skipped."""


# ----------------------------------------------------------------------------------- the model


def decoder_linears(model) -> list[str]:
    """Names of every nn.Linear inside the decoder blocks (the model's ``layers`` ModuleList)."""
    from torch import nn

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    blocks = decoder.layers
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    names = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("found no nn.Linear inside the decoder blocks")
    return names


def parallel_groups(names: list[str]) -> list[list[str]]:
    """Layers that read the same input inside a block: [q, k, v] and [gate, up]."""
    have = set(names)
    groups = []
    for n in names:
        for first, rest in (("self_attn.q_proj", ("self_attn.k_proj", "self_attn.v_proj")),
                            ("mlp.gate_proj", ("mlp.up_proj",))):
            if n.endswith("." + first):
                base = n[: -len(first)]
                group = [n] + [base + r for r in rest]
                if all(g in have for g in group):
                    groups.append(group)
    return groups


# ------------------------------------------------------------------------------------ specquant


def specquant_config(method: str, grid: Grid, seed: int):
    """The specquant config of ``method`` on ``grid``; Unavailable when this specquant lacks it."""
    from specquant.algorithms import ModuleSettings, make_config, method_names

    settings = {"bits": grid.bits, "granularity": grid.granularity, "symmetric": grid.symmetric, "seed": seed,
                "modules": {"lm_head": ModuleSettings(skip=True)}}
    if method in ("rtn-minmax", "rtn-output-mse"):
        return make_config("rtn", scale_rule=method[len("rtn-"):], **settings)
    if "@" in method:  # M@RULE: method M with the step rule RULE instead of its default
        inner, rule = method.split("@", 1)
        return specquant_config_with(inner, grid, seed, scale_rule=rule)
    if method.startswith("awq+"):
        inner = method[len("awq+"):]
        try:  # AWQ exposed as a method name "awq+M" ...
            return make_config(method, **settings)
        except ValueError as by_name:
            if inner not in method_names():
                raise Unavailable(f"method {inner!r} is not registered ({by_name})") from None
            try:  # ... or as a config field awq=True of M's config
                return make_config(inner, awq=True, **settings)
            except (ValueError, TypeError) as by_field:
                raise Unavailable(f"no AWQ in this specquant (by name: {by_name}; as a field: {by_field})") from None
    if method not in method_names():
        raise Unavailable(f"method {method!r} is not registered (have: {', '.join(method_names())})")
    return make_config(method, **settings)


def specquant_config_with(method: str, grid: Grid, seed: int, **fields):
    """``specquant_config(method, ...)`` with some config fields replaced (Unavailable if refused)."""
    import dataclasses

    config = specquant_config(method, grid, seed)
    try:
        return dataclasses.replace(config, **fields)
    except (TypeError, ValueError) as e:
        raise Unavailable(f"{method} with {fields}: {e}") from None


def specquant_grid_check(grid: Grid, in_dims: list[int]) -> None:
    """Unavailable when specquant refuses ``grid`` on a Linear with one of these input widths."""
    import torch
    from torch import nn

    import specquant as sq

    for d in sorted(set(in_dims)):
        layer = nn.Sequential(nn.Linear(d, 2, bias=False))
        cfg = sq.RTNConfig(bits=grid.bits, granularity=grid.granularity, symmetric=grid.symmetric)
        try:
            sq.quantize(layer, cfg, example_input=torch.zeros(1, d), progress=False)
        except ValueError as e:
            raise Unavailable(f"specquant refuses {grid.name} on a {d}-input layer ({str(e).split(': ', 1)[-1]})"
                              ) from None


# ------------------------------------------------------------------------------------- Brevitas


def brevitas_weight_quant(grid: Grid):
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat
    from brevitas.quant.shifted_scaled_int import ShiftedUint8WeightGroupQuantFloat, ShiftedUint8WeightPerChannelFloat

    held = {"bit_width": grid.bits, "scaling_impl_type": ScalingImplType.PARAMETER_FROM_STATS}
    if grid.symmetric:
        return Int8WeightPerChannelFloat.let(**held)
    held["zero_point_impl"] = ParameterFromStatsFromParameterZeroPoint
    if grid.group_size is not None:
        return ShiftedUint8WeightGroupQuantFloat.let(group_size=grid.group_size, **held)
    return ShiftedUint8WeightPerChannelFloat.let(**held)


def _quant_state(layer):
    """(dequantized weight, scale, zero point) of a QuantLinear, detached copies."""
    q = layer.quant_weight()
    return q.value.detach().clone(), q.scale.detach().clone(), q.zero_point.detach().clone()


def brevitas_quantize(model, names: list[str], method: str, grid: Grid, batches: list, sequential: bool) -> dict:
    """Quantize ``names`` with Brevitas in place; returns timing and the GPxQ checks."""
    from functools import partial

    import brevitas.nn as qnn
    import torch
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.qronos import Qronos

    if method not in BREVITAS_METHODS:
        raise ValueError(f"unknown Brevitas method {method!r}; allowed: {', '.join(BREVITAS_METHODS)}")
    t0 = time.perf_counter()
    weight_quant = brevitas_weight_quant(grid)
    for name in names:
        lin = model.get_submodule(name)
        new = qnn.QuantLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, weight_quant=weight_quant)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.eval()
    with torch.no_grad():  # one forward: the held scales and zero points are set from the full weights
        model(batches[0][:1])
    setup_s = time.perf_counter() - t0
    layers = {n: model.get_submodule(n) for n in names}
    for n, layer in layers.items():
        for sub in layer.weight_quant.modules():
            if getattr(sub, "init_done", True) is not True:
                raise AssertionError(f"Brevitas' weight quantizer of {n} was not initialised by the forward")
    if method == "rtn":
        return {"quant_seconds": setup_s, "changed_vs_rtn": 0.0}
    before = {n: _quant_state(m) for n, m in layers.items()}  # RTN on the held grid (not timed)

    t1 = time.perf_counter()
    kwargs = {"act_order": True, "use_quant_activations": False,
              "group_of_parallel_layers": None if sequential else parallel_groups(names) or None}
    if method == "gptq":
        mode = gptq_mode(model, **kwargs)
    elif method == "gpfq":
        mode = gpfq_mode(model, **kwargs)
    else:
        mode = gpfq_mode(model, algorithm_impl=partial(Qronos, alpha=1e-6), **kwargs)
    with torch.no_grad(), mode as ctx:
        for _ in range(ctx.num_layers):
            for x in batches:
                ctx.model(x)
            ctx.update()
    gpxq_s = time.perf_counter() - t1

    changed = total = 0
    unchanged_layers = []
    for n, layer in layers.items():
        w_rtn, s0, z0 = before[n]
        w, s, z = _quant_state(layer)
        if not (torch.equal(s, s0) and torch.equal(z, z0)):
            raise AssertionError(f"Brevitas {method}: the scale or zero point of {n} moved during GPxQ "
                                 "(runtime statistics): the grid is not held")
        c = int((w != w_rtn).sum())
        changed += c
        total += w.numel()
        if c == 0:
            unchanged_layers.append(n)
    share = changed / total
    if share < MIN_CHANGED:
        raise AssertionError(f"Brevitas {method} left {100 * (1 - share):.2f} % of the weights on RTN's codes: "
                             "GPxQ did not run on the held grid (Brevitas' runtime-stats scale trap?)")
    return {"quant_seconds": setup_s + gpxq_s, "changed_vs_rtn": share, "unchanged_layers": unchanged_layers,
            "brevitas_parallel_groups": not sequential}


# --------------------------------------------------------------------------------------- a job


def _job(spec: dict) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

    torch.set_num_threads(spec["threads"])
    from specquant.eval.perplexity import perplexity
    from specquant.models import get_model

    model, entry = get_model(spec["model"], spec["data_dir"])
    if entry.kind != "lm":
        raise ValueError(f"{spec['model']} is not a language model (kind {entry.kind!r})")
    ids, _ = entry.test(spec["data_dir"])
    names = decoder_linears(model)
    tool, method = spec["tool"], spec["method"]
    rec = {"tool": tool, "method": method, "grid": spec.get("grid"), "model": spec["model"], "calib": spec["calib"],
           "seq_len": spec["seq_len"], "seed": spec["seed"], "threads": spec["threads"],
           "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "quantized_layers": len(names)}
    if tool == "float":
        rec["in_dims"] = sorted({model.get_submodule(n).in_features for n in names})
    else:
        grid = parse_grid(spec["grid"])
        rec.update(bits=grid.bits, levels=grid.levels, granularity=grid.granularity, symmetric=grid.symmetric)
        calib = entry.calib(spec["calib"], spec["seed"], spec["data_dir"], seq_len=spec["seq_len"])
        if tool == "specquant":
            import specquant as sq

            config = specquant_config(method, grid, spec["seed"])
            # A data-free method (RTN on min/max or weight-MSE ranges) gets no calibration batches: with them the
            # engine would stream every layer's statistics only for the report's output errors, which Brevitas'
            # RTN does not compute either.
            free = not (config.needs_data or getattr(config, "scale_rule", None) == "output-mse"
                        or config.bias_correction)
            rec["calibration_used"] = not free
            t0 = time.perf_counter()
            report = sq.quantize(model, config, calib=None if free else calib, batch_size=spec["batch"],
                                 progress=False)
            rec["quant_seconds"] = time.perf_counter() - t0
            done = sorted(r.name for r in report.layers)
            if done != sorted(names):
                raise AssertionError(f"specquant quantized {done}, not the decoder Linears {sorted(names)}")
            rec["config"] = config.to_dict()
        elif tool == "brevitas":
            rec.update(brevitas_quantize(model, names, method, grid, list(calib.split(spec["batch"])),
                                         spec["brevitas_sequential"]))
        else:
            raise ValueError(f"unknown tool {tool!r}")
        rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    r = perplexity(model, ids, spec["seq_len"], spec["eval_windows"])
    rec["eval_seconds"] = time.perf_counter() - t0
    rec.update(ppl=r.perplexity, nll=r.nll, tokens=r.tokens, predicted_tokens=r.predicted, windows=r.windows)
    if spec["full_eval"]:
        f = perplexity(model, ids, spec["seq_len"], None)
        rec.update(ppl_full=f.perplexity, tokens_full=f.tokens, predicted_tokens_full=f.predicted,
                   windows_full=f.windows)
    rec["peak_rss_eval_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rec


def run_job(spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1, maxtasksperchild=1)
    try:
        return pool.apply(_job, (spec,))
    finally:
        pool.close()
        pool.join()


# --------------------------------------------------------------------------------------- output


def print_tables(records: list[dict], float_rec: dict, grids: list[str], runs: list[str], full: bool) -> None:
    print(f"\nfloat perplexity {float_rec['ppl']:.3f} ({float_rec['windows']} x {float_rec['seq_len']} tokens)"
          + (f", whole test text {float_rec['ppl_full']:.3f} ({float_rec['windows_full']} windows)" if full else ""))
    cols = [r for r in runs if any(f"{x['tool']}:{x['method']}" == r for x in records)]
    by = {(x["grid"], f"{x['tool']}:{x['method']}"): x for x in records}
    if cols:
        wide = 9 if full else 0
        print("\nperplexity (first windows)" + (" / whole test text" if full else ""))
        print(f"{'grid':<9}" + "".join(f" {c:>{max(9, len(c)) + wide}}" for c in cols))
        for g in grids:
            cells = []
            for c in cols:
                x = by.get((g, c))
                cell = "skipped" if x is None else f"{x['ppl']:.3f}" + (f" / {x['ppl_full']:.3f}" if full else "")
                cells.append(f" {cell:>{max(9, len(c)) + wide}}")
            print(f"{g:<9}" + "".join(cells))
    print(f"\n{'grid':<9} {'tool':>9} {'method':<12} {'ppl':>9} {'quant s':>9} {'peak MB':>8} {'changed':>8}")
    for x in records:
        ch = x.get("changed_vs_rtn")
        print(f"{x['grid']:<9} {x['tool']:>9} {x['method']:<12} {x['ppl']:>9.3f} {x['quant_seconds']:>9.2f} "
              f"{x['peak_rss_mb']:>8.0f} {'-' if ch is None else f'{100 * ch:.1f} %':>8}")


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def combine(rs: list[dict], float_rec: dict, full_eval: bool) -> dict:
    """One record of a job's repeats: times and memory are medians (all values kept under ``*_all``)."""
    rec = dict(rs[0])
    if len({r["ppl"] for r in rs}) > 1:
        rec["ppl_all"] = [r["ppl"] for r in rs]  # should not happen at a fixed thread count
    for key in ("quant_seconds", "peak_rss_mb", "peak_rss_eval_mb", "eval_seconds"):
        rec[key + "_all"] = [r[key] for r in rs]
        rec[key] = statistics.median(rec[key + "_all"])
    rec["float_ppl"] = float_rec["ppl"]
    if full_eval:
        rec["float_ppl_full"] = float_rec["ppl_full"]
    return rec


RESUME_KEYS = ("model", "calib", "seq_len", "eval_windows", "full_eval", "seed", "batch", "threads",
               "brevitas_sequential")


def protocol_difference(meta: dict, float_rec: dict, ref_meta: dict, ref_float: dict,
                        versions: tuple[str, ...] | None = None) -> str | None:
    """The first way a JSON's protocol (``meta``, ``float_rec``) differs from the reference's: a
    RESUME_KEYS setting, a library version (``versions``: those libraries; None: all of them) or the
    float perplexity; None when they agree."""
    for k in RESUME_KEYS:
        if meta.get(k) != ref_meta.get(k):
            return f"{k} = {meta.get(k)!r}, not {ref_meta.get(k)!r}"
    have, want = meta.get("versions", {}), ref_meta.get("versions", {})
    for k in (sorted(set(have) | set(want)) if versions is None else versions):
        if have.get(k) != want.get(k):
            return f"{k} {have.get(k)!r}, not {want.get(k)!r}"
    if float_rec.get("ppl") != ref_float.get("ppl"):
        return f"float perplexity {float_rec.get('ppl')!r}, not {ref_float.get('ppl')!r}"
    return None


def resumable(path: str, meta: dict, float_rec: dict) -> dict[tuple, dict]:
    """The finished runs of an earlier JSON at ``path`` made with the same protocol (RESUME_KEYS,
    library versions and the same float perplexity), by (grid, tool, method); {} when there is
    none or it differs."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    m = old.get("meta", {}) if isinstance(old, dict) else {}
    if protocol_difference(m, old.get("float", {}), meta, float_rec) is not None:
        print(f"--resume: {path} was made with other settings; nothing kept", file=sys.stderr, flush=True)
        return {}
    out = {}
    for r in old.get("runs", []):
        out[(r["grid"], r["tool"], r["method"])] = r
    return out


def merge_results(paths: list[str]) -> tuple[dict, list[dict]]:
    """The float record and the runs of several JSONs of this script made with one protocol.

    Refuses (ValueError, one line) files made with another protocol (RESUME_KEYS), another Brevitas
    or torch version or another float perplexity than the first file, and a (grid, tool, method)
    found in two files with different perplexities; each run gets the file it came from as
    ``source``."""
    first_meta = first_float = None
    runs: dict[tuple, dict] = {}
    for path in paths:
        try:
            obj = json.loads(Path(path).read_text())
            meta, float_rec, recs = obj["meta"], obj["float"], obj["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a JSON of this script ({type(e).__name__}: {e})") from None
        if first_meta is None:
            first_meta, first_float = meta, float_rec
        diff = protocol_difference(meta, float_rec, first_meta, first_float, versions=("brevitas", "torch"))
        if diff is not None:
            raise ValueError(f"{path}: {diff} as in {paths[0]}")
        for r in recs:
            key = (r["grid"], r["tool"], r["method"])
            if key in runs and runs[key]["ppl"] != r["ppl"]:
                raise ValueError(f"{key[1]}:{key[2]} on {key[0]} is in {runs[key]['source']} (ppl {runs[key]['ppl']}) "
                                 f"and in {path} (ppl {r['ppl']})")
            runs[key] = {**r, "source": path}
    return first_float, list(runs.values())


def goals(float_rec: dict, runs: list[dict], ratio_grid: str = "w3g128a") -> list[dict]:
    """The issue's goals per grid, from merged runs: specquant's best method below the best Brevitas
    method (decided only when all of Brevitas' methods ran), and against Brevitas GPTQ: the gap to
    float at most half of its gap (on ``ratio_grid``), the quantization time at most half of its
    time, the peak RSS no higher.  None where a run needed for the check is missing."""
    out = []
    for grid in dict.fromkeys(r["grid"] for r in runs):
        sq = [r for r in runs if r["grid"] == grid and r["tool"] == "specquant"]
        br = [r for r in runs if r["grid"] == grid and r["tool"] == "brevitas"]
        best_sq = min(sq, key=lambda r: r["ppl"]) if sq else None
        best_br = min(br, key=lambda r: r["ppl"]) if br else None
        missing = [m for m in BREVITAS_METHODS if not any(r["method"] == m for r in br)]
        gptq = next((r for r in br if r["method"] == "gptq"), None)
        row = {"grid": grid, "specquant_best": best_sq and best_sq["method"],
               "specquant_best_ppl": best_sq and best_sq["ppl"],
               "brevitas_best": best_br and best_br["method"], "brevitas_best_ppl": best_br and best_br["ppl"],
               "brevitas_missing": missing, "float_ppl": float_rec["ppl"],
               "best_below_brevitas_best": None, "gap_ratio_vs_brevitas_gptq": None,
               "time_ratio_vs_brevitas_gptq": None, "rss_ratio_vs_brevitas_gptq": None}
        if best_sq and best_br and not missing:
            row["best_below_brevitas_best"] = best_sq["ppl"] < best_br["ppl"]
        if best_sq and gptq:
            row["gap_ratio_vs_brevitas_gptq"] = ((best_sq["ppl"] - float_rec["ppl"])
                                                 / (gptq["ppl"] - float_rec["ppl"]))
            row["time_ratio_vs_brevitas_gptq"] = best_sq["quant_seconds"] / gptq["quant_seconds"]
            row["rss_ratio_vs_brevitas_gptq"] = best_sq["peak_rss_mb"] / gptq["peak_rss_mb"]
        row["gap_goal_applies"] = grid == ratio_grid
        out.append(row)
    return out


def print_goal_table(float_rec: dict, runs: list[dict], rows: list[dict]) -> None:
    print(f"float perplexity {float_rec['ppl']:.3f} ({float_rec['windows']} x {float_rec['seq_len']} tokens)\n")
    print(f"{'grid':<9} {'tool':>9} {'method':<22} {'ppl':>9} {'quant s':>9} {'peak MB':>8}  source")
    grids = list(dict.fromkeys(r["grid"] for r in runs))
    for r in sorted(runs, key=lambda r: (grids.index(r["grid"]), r["tool"], r["ppl"])):
        print(f"{r['grid']:<9} {r['tool']:>9} {r['method']:<22} {r['ppl']:>9.3f} {r['quant_seconds']:>9.1f} "
              f"{r['peak_rss_mb']:>8.0f}  {r['source']}")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"\n{'grid':<9} {'sq best':>22} {'Br best':>16} {'sq < Br best':>13} {'gap/GPTQ':>9} {'s/GPTQ':>7} "
          f"{'RSS/GPTQ':>9}  Brevitas runs missing")
    for g in rows:
        below = {None: "undecided", True: "yes", False: "NO"}[g["best_below_brevitas_best"]]
        sq = "-" if g["specquant_best"] is None else f"{g['specquant_best']} {g['specquant_best_ppl']:.2f}"
        br = "-" if g["brevitas_best"] is None else f"{g['brevitas_best']} {g['brevitas_best_ppl']:.2f}"
        print(f"{g['grid']:<9} {sq:>22} {br:>16} {below:>13} {f(g['gap_ratio_vs_brevitas_gptq'], '.2f'):>9} "
              f"{f(g['time_ratio_vs_brevitas_gptq'], '.2f'):>7} {f(g['rss_ratio_vs_brevitas_gptq'], '.2f'):>9}  "
              f"{' '.join(g['brevitas_missing']) or '-'}")
    print("\ngoals: sq best < Brevitas best at every grid (decided when all of Brevitas' methods ran); at "
          "w3g128a gap/GPTQ <= 0.5; s/GPTQ <= 0.5; RSS/GPTQ <= 1")


def table_main(paths: list[str], out: str | None) -> int:
    try:
        float_rec, runs = merge_results(paths)
    except ValueError as e:
        print(f"llm_vs_peers --table: {e}", file=sys.stderr)
        return 2
    rows = goals(float_rec, runs)
    print_goal_table(float_rec, runs, rows)
    if out:
        write_json(out, {"sources": paths, "float": float_rec, "goals": rows, "runs": runs})
        print(f"\nJSON: {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo id of a language model (default {DEFAULT_MODEL})")
    p.add_argument("--calib", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window, calibration and test (default 512)")
    p.add_argument("--eval-windows", type=int, default=40, help="first test windows scored (default 40)")
    p.add_argument("--full-eval", action="store_true", help="also score the whole test text")
    p.add_argument("--grids", nargs="+", default=DEFAULT_GRIDS, help=f"grids (default {' '.join(DEFAULT_GRIDS)})")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="tool:method entries (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="runs per job, interleaved; times are medians (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="calibration windows per forward, both tools (default 8)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per job (default: $OMP_NUM_THREADS, else 1)")
    p.add_argument("--brevitas-sequential", action="store_true",
                   help="no group_of_parallel_layers for Brevitas: one pass per layer (slower, same result)")
    p.add_argument("--out", default=None,
                   help="JSON output (default bench-out/llm_vs_peers.json; --smoke: bench-out/llm_vs_peers_smoke.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs of an earlier --out JSON made with the same protocol and run only "
                        "the missing ones (every finished run is written at once, so a stopped benchmark resumes)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--smoke", action="store_true",
                   help="tiniest setting: " + " ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--table", nargs="+", metavar="JSON", default=None,
                   help="run nothing: merge the runs of these JSONs (one protocol), print them and the goals per "
                        "grid (--out: the merged JSON)")
    a = p.parse_args(argv)
    if a.table:
        return table_main(a.table, a.out)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    a.out = a.out or ("bench-out/llm_vs_peers_smoke.json" if a.smoke else "bench-out/llm_vs_peers.json")
    threads = a.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    try:
        grids = [parse_grid(g) for g in a.grids]
    except ValueError as e:
        p.error(f"--grids: {e}")
    for r in a.runs:
        tool, _, method = r.partition(":")
        if tool not in ("specquant", "brevitas") or not method:
            p.error(f"--runs: expected specquant:METHOD or brevitas:METHOD, got {r!r}")
        if tool == "brevitas" and method not in BREVITAS_METHODS:
            p.error(f"--runs: Brevitas methods are {', '.join(BREVITAS_METHODS)}, got {method!r}")

    import brevitas
    import torch
    import transformers

    import specquant
    from specquant.models import get_entry
    from specquant.models.data import data_dir

    entry = get_entry(a.model)  # an unknown id fails here, before any work
    dd = str(data_dir(a.data_dir))
    base = {"model": a.model, "calib": a.calib, "seq_len": a.seq_len, "eval_windows": a.eval_windows,
            "full_eval": a.full_eval, "seed": a.seed, "batch": a.batch, "threads": threads, "data_dir": dd,
            "brevitas_sequential": a.brevitas_sequential}
    meta = {"script": "benchmarks/llm_vs_peers.py", "argv": sys.argv[1:] if argv is None else list(argv),
            **{k: v for k, v in base.items() if k != "data_dir"}, "grids": a.grids, "runs": a.runs,
            "repeats": a.repeats, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "versions": {"specquant": specquant.__version__, "brevitas": brevitas.__version__,
                         "torch": torch.__version__, "transformers": transformers.__version__},
            "model_description": entry.description}
    print(f"float {a.model} ...", file=sys.stderr, flush=True)
    float_rec = run_job({**base, "tool": "float", "method": "float"})
    print(f"float perplexity {float_rec['ppl']:.3f}", file=sys.stderr, flush=True)
    meta["torch_threads"] = float_rec["torch_threads"]

    # What this installation cannot run, decided before any job: the reason is printed and kept.
    skipped, jobs = [], []
    for g in grids:
        grid_refused = None
        if any(r.startswith("specquant:") for r in a.runs):
            try:
                specquant_grid_check(g, float_rec["in_dims"])
            except Unavailable as e:
                grid_refused = str(e)
                print(f"skip specquant on {g.name}: {e}", file=sys.stderr, flush=True)
        for r in a.runs:
            tool, _, method = r.partition(":")
            reason = None
            if tool == "specquant":
                reason = grid_refused
                if reason is None:
                    try:
                        specquant_config(method, g, a.seed)
                    except Unavailable as e:
                        reason = str(e)
            if reason is not None:
                skipped.append({"tool": tool, "method": method, "grid": g.name, "reason": reason})
                if reason != grid_refused and reason not in {x["reason"] for x in skipped[:-1]}:
                    print(f"skip {r}: {reason}", file=sys.stderr, flush=True)
            else:
                jobs.append((g.name, tool, method))

    order = list(jobs)
    records: list[dict] = []
    kept = resumable(a.out, meta, float_rec) if a.resume else {}
    if kept:
        print(f"--resume: {len(kept)} finished run(s) kept from {a.out}", file=sys.stderr, flush=True)
    records.extend(r for j, r in kept.items() if j not in order)  # runs not asked for this time stay in the file
    for gname in a.grids:
        todo = [j for j in jobs if j[0] == gname]
        records.extend(kept[j] for j in todo if j in kept)
        todo = [j for j in todo if j not in kept]
        reps: dict[tuple, list] = {j: [] for j in todo}
        for _ in range(a.repeats):
            for j in todo:
                rec = run_job({**base, "grid": j[0], "tool": j[1], "method": j[2]})
                reps[j].append(rec)
                print(f"{gname:<8} {j[1]:>9}:{j[2]:<12} ppl {rec['ppl']:9.3f}  {rec['quant_seconds']:8.2f} s  "
                      f"{rec['peak_rss_mb']:6.0f} MB", file=sys.stderr, flush=True)
                if a.repeats == 1:  # each finished run lands at once: a long run stopped later keeps it
                    partial = records + [combine([rec], float_rec, a.full_eval)]
                    write_json(a.out, {"meta": meta, "float": float_rec, "runs": partial, "skipped": skipped})
        records.extend(combine(reps[j], float_rec, a.full_eval) for j in todo)
        records.sort(key=lambda r: order.index(key) if (key := (r["grid"], r["tool"], r["method"])) in order
                     else len(order))
        write_json(a.out, {"meta": meta, "float": float_rec, "runs": records, "skipped": skipped})
    write_json(a.out, {"meta": meta, "float": float_rec, "runs": records, "skipped": skipped})
    print_tables(records, float_rec, a.grids, a.runs, a.full_eval)
    reasons: dict[str, list[str]] = {}
    for s in skipped:
        reasons.setdefault(s["reason"], []).append(f"{s['tool']}:{s['method']} on {s['grid']}")
    for reason, what in reasons.items():
        print(f"skipped {', '.join(what)}: {reason}")
    print(f"\nthreads per job: {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch "
          f"{float_rec['torch_threads']}); JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
