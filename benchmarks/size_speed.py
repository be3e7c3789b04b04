"""Real compression: file size, resident memory and speed of packed models and layers.

(a) Size: ``resnet20-cifar10`` and ``mnist-mlp`` (``specquant.models.get_model``; ``mnist-mlp`` is
    trained and cached on first use) quantized with RTN at 2, 3, 4 and 8 bits (per channel, MSE
    clipping), saved with ``specquant.io.save`` (fp32 scales, the default; the fp16-scale size is
    listed too), against the ideal Σ ceil(bits·weights/8) + scales + float tensors, with the bits
    per quantized weight including every overhead (scales, headers).  The budget checked is
    file ≤ 1.02·ideal + 16 KiB.  A model whose data directory is missing is skipped, saying so.
(b) Memory: bytes of every tensor of the loaded packed model against the float model (and the
    process RSS growth while loading, which also counts the allocator's and the file's pages).
(c) Speed, medians of repeated runs after warm-up, all in the same process and thread setting:
    one 4096×4096 layer and the whole models at batch 1 and 64: fp32 ``nn.Linear`` / float model,
    ``QuantLinear`` weight-only at 2, 3, 4, 8 bits, the int8 dynamic path (8-bit weights and
    activations, ``torch._int_mm``), and torchao's int8 weight-only layer (and its int8 dynamic
    one) when ``import torchao`` works, else recorded as "not installed".

    .venv/bin/python benchmarks/size_speed.py [--out bench-out/size_speed.json] [--quick]
                                              [--threads 1] [--data-dir DIR]

Runs on one intra-op thread by default: on a shared 2-core machine, two OpenMP threads wait on
each other and small kernels take milliseconds instead of microseconds (``--threads`` changes it).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from specquant.algorithms import RTNConfig
from specquant.core.quantizer import quantize_tensor
from specquant.engine.apply import quantize
from specquant.io import load, save, storage_breakdown
from specquant.nn import QuantLinear, memory_bytes

MODELS = ("resnet20-cifar10", "mnist-mlp")
BITS = (2, 3, 4, 8)
BATCHES = (1, 64)


def log(msg: str) -> None:
    print(f"[size_speed] {msg}", file=sys.stderr, flush=True)


def time_interleaved(fns: dict, reps: int, warmup: int = 2, budget_s: float = 20.0, min_rounds: int = 3) -> dict:
    """Median (and quartiles) in ms of each callable, timed in interleaved rounds.

    Every round calls each function once, in turn, so that a change of load on a shared machine
    hits all of them alike and the ratios of one run stay fair.  Stops early (at least
    ``min_rounds`` rounds) once ``budget_s`` seconds have passed.  (benchmarks/runtimes.py uses it too.)
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        start = time.perf_counter()
        for r in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
            if r >= min_rounds - 1 and time.perf_counter() - start > budget_s:
                break
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[k] = {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "runs": len(ts)}
    return out


def timed_batches(variants: dict, inputs: dict, reps: int) -> dict:
    """``{name}_b{batch}`` timings of every variant (a callable model) on every batch."""
    fns = {f"{name}_b{b}": (lambda m=m, x=x: m(x)) for b, x in inputs.items() for name, m in variants.items()}
    return time_interleaved(fns, reps)


def rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def torchao_status() -> tuple[object | None, str]:
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"not installed ({type(e).__name__})"
    import torchao

    return quantize_, f"torchao {torchao.__version__}"


def torchao_quantized(module: nn.Module, kind: str):
    """A copy of ``module`` with torchao's int8 weight-only or int8 dynamic Linear layers."""
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError:  # older torchao
        from torchao.quantization import int8_dynamic_activation_int8_weight as Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import int8_weight_only as Int8WeightOnlyConfig
    m = copy.deepcopy(module)
    quantize_(m, Int8WeightOnlyConfig() if kind == "int8wo" else Int8DynamicActivationInt8WeightConfig())
    return m


# ---------------------------------------------------------------------------------------------


def size_and_memory(model_id: str, data_dir, tmp: Path, reps: int, bits_list) -> dict:
    from specquant.models import get_model

    t0 = time.perf_counter()
    model, entry = get_model(model_id, data_dir)
    log(f"{model_id}: loaded in {time.perf_counter() - t0:.1f} s")
    calib = entry.calib(64, 0, data_dir)
    x1, x64 = calib[:1], calib[:64]
    float_path = save(model, tmp / f"{model_id}-float.sq", model_id=model_id)
    res = {
        "model": model_id,
        "params": sum(p.numel() for p in model.parameters()),
        "float_tensor_bytes": memory_bytes(model),
        "float_file_bytes": float_path.stat().st_size,
        "quantized": [],
        "speed": {},
    }
    speed = res["speed"]
    variants = {"fp32": model}
    ao_fn, _ = torchao_status()
    has_linear_only = all(not isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())
    if ao_fn is not None and has_linear_only:
        for kind in ("int8wo", "int8dyn"):
            try:
                variants[f"torchao_{kind}"] = torchao_quantized(model, kind)
            except Exception as e:  # noqa: BLE001 - report, don't stop the run
                speed[f"torchao_{kind}"] = f"failed: {type(e).__name__}: {e}"
    elif ao_fn is not None:
        speed["torchao"] = "n/a: torchao quantizes Linear layers only (this model is convolutional)"
    for bits in bits_list:
        fq = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = quantize(fq, RTNConfig(bits=bits), calib=calib, progress=False)
        q_s = time.perf_counter() - t0
        path = save(fq, tmp / f"{model_id}-{bits}.sq", model_id=model_id, meta={"method": "rtn", "bits": bits})
        br = storage_breakdown(path)
        path16 = save(fq, tmp / f"{model_id}-{bits}-fp16.sq", model_id=model_id, scale_dtype="fp16")
        rss0 = rss_bytes()
        loaded = load(path)
        rss1 = rss_bytes()
        with torch.inference_mode():
            y_loaded, y_mem = loaded(x64), fq(x64)
        budget = 1.02 * br["ideal_bytes"] + 16 * 1024
        row = {
            "bits": bits,
            "scale_dtype": "float32",
            "file_bytes": br["file_bytes"],
            "ideal_bytes": br["ideal_bytes"],
            "overhead_bytes": br["overhead_bytes"],
            "budget_bytes": int(budget),
            "within_budget": br["file_bytes"] <= budget,
            "codes_bytes": br["codes_bytes"],
            "scale_bytes": br["scale_bytes"],
            "float_bytes": br["float_bytes"],
            "quantized_weights": br["quantized_weights"],
            "bits_per_weight": br["bits_per_weight"],
            "file_bytes_fp16_scales": path16.stat().st_size,
            "bits_per_weight_fp16_scales": storage_breakdown(path16)["bits_per_weight"],
            "folded_bn": len(report.folded_bn),
            "loaded_tensor_bytes": memory_bytes(loaded),
            "loaded_vs_float_memory": memory_bytes(loaded) / res["float_tensor_bytes"],
            "rss_delta_bytes_on_load": None if rss0 is None else rss1 - rss0,
            "loaded_equals_in_memory": bool(torch.equal(y_loaded, y_mem)),
            "loaded_max_abs_diff": float((y_loaded - y_mem).abs().max()),
            "quant_seconds": q_s,
        }
        res["quantized"].append(row)
        variants[f"wo{bits}"] = loaded
        if bits == 8:
            variants["int8dyn"] = load(path, int8_dynamic=True)
            if not has_linear_only:
                variants["int8dynall"] = load(path, int8_dynamic="all")
        log(f"{model_id} {bits}-bit: {br['file_bytes']} B (ideal {br['ideal_bytes']}), "
            f"{br['bits_per_weight']:.3f} bits/weight")
    speed.update(timed_batches(variants, {1: x1, 64: x64}, reps))
    return res


def layer_speed(n: int, reps: int, bits_list) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(n, n)
    out = {"shape": [n, n], "float_bytes": memory_bytes(lin)}
    variants = {"fp32": lin}
    for bits in bits_list:
        qw = quantize_tensor(lin.weight.detach(), bits=bits, clipping="minmax")
        variants[f"wo{bits}"] = QuantLinear.from_quantized(lin, qw)
        out[f"wo{bits}_bytes"] = memory_bytes(variants[f"wo{bits}"])
        if bits == 4:  # what caching the float weight buys (and costs in memory)
            variants["wo4cached"] = QuantLinear.from_quantized(lin, qw, cache_dequantized=True)
        if bits == 8:
            variants["int8dyn"] = QuantLinear.from_quantized(lin, qw, mode="int8_dynamic")
            out["int8dyn_bytes"] = memory_bytes(variants["int8dyn"])
        del qw
    ao_fn, status = torchao_status()
    out["torchao"] = status
    if ao_fn is not None:
        for kind in ("int8wo", "int8dyn"):
            try:
                variants[f"torchao_{kind}"] = torchao_quantized(nn.Sequential(lin), kind)
            except Exception as e:  # noqa: BLE001
                out[f"torchao_{kind}"] = f"failed: {type(e).__name__}: {e}"
    out.update(timed_batches(variants, {b: torch.randn(b, n) for b in BATCHES}, reps))
    if "wo4cached" in variants:
        out["wo4cached_bytes"] = memory_bytes(variants["wo4cached"])  # after its first call
    return out


# ---------------------------------------------------------------------------------------------

LABELS = [("fp32", "fp32 float"), *[(f"wo{b}", f"{b}-bit weight-only") for b in BITS],
          ("wo4cached", "4-bit, cache_dequantized"), ("int8dyn", "int8 dynamic (W8A8 Linear)"),
          ("int8dynall", "int8 dynamic, convs too"),
          ("torchao_int8wo", "torchao int8 weight-only"), ("torchao_int8dyn", "torchao int8 dynamic")]


def speed_table(title: str, d: dict) -> None:
    print(f"\n{title}")
    print(f"  {'path':<28} {'batch 1 ms':>11} {'x fp32':>7} {'batch 64 ms':>12} {'x fp32':>7}")
    base = {b: d.get(f"fp32_b{b}", {}).get("median_ms") for b in BATCHES}
    for key, label in LABELS:
        cells = []
        for b in BATCHES:
            v = d.get(f"{key}_b{b}")
            if isinstance(v, dict):
                ms = v["median_ms"]
                cells.append(f"{ms:>11.3f} {base[b] / ms:>6.2f}x" if base[b] else f"{ms:>11.3f} {'':>7}")
            else:
                cells.append(f"{'—':>11} {'':>7}")
        if any("—" not in c for c in cells):
            print(f"  {label:<28} {cells[0]} {cells[1]:>20}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/size_speed.json", help="JSON output path")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, bits 4 and 8 only, a 2048² layer")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see the doc)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the zoo's resolution)")
    p.add_argument("--models", nargs="*", default=list(MODELS), help="zoo ids for (a), (b) and whole-model speed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 7 if args.quick else 21
    bits_list = (4, 8) if args.quick else BITS
    n = 2048 if args.quick else 4096
    t_start = time.perf_counter()
    _, ao_status = torchao_status()
    result = {
        "benchmark": "size_speed",
        "torch": torch.__version__,
        "torchao": ao_status,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "quick": args.quick,
        "reps": reps,
        "models": {},
        "layer": None,
    }
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
        result["cpu"] = cpu or result["cpu"]
    except OSError:
        pass
    from specquant.models.data import DataNotFoundError

    with tempfile.TemporaryDirectory(prefix="sq-bench-") as tmpdir:
        for model_id in args.models:
            try:
                result["models"][model_id] = size_and_memory(model_id, args.data_dir, Path(tmpdir), reps, bits_list)
            except DataNotFoundError as e:
                log(f"{model_id}: skipped, data directory missing ({e})")
                result["models"][model_id] = {"skipped": f"data directory missing: {e}"}
    log(f"layer {n}x{n} ...")
    result["layer"] = layer_speed(n, reps, bits_list)
    result["seconds"] = time.perf_counter() - t_start

    # ---- tables ---------------------------------------------------------------------------
    print(f"torch {result['torch']}, {result['torchao']}, {result['threads']} thread(s), {result['cpu']}")
    print("\n(a) file size, RTN per channel, fp32 scales (budget: 1.02·ideal + 16 KiB)")
    print(f"  {'model':<18} {'bits':>4} {'file B':>9} {'ideal B':>9} {'overhd B':>8} {'ok':>3} "
          f"{'bits/w':>7} {'fp16-sc B':>9} {'bits/w':>7} {'vs float':>8}")
    for mid, r in result["models"].items():
        if "skipped" in r:
            print(f"  {mid:<18} skipped: {r['skipped']}")
            continue
        for q in r["quantized"]:
            print(f"  {mid:<18} {q['bits']:>4} {q['file_bytes']:>9} {q['ideal_bytes']:>9} {q['overhead_bytes']:>8} "
                  f"{'yes' if q['within_budget'] else 'NO':>3} {q['bits_per_weight']:>7.3f} "
                  f"{q['file_bytes_fp16_scales']:>9} {q['bits_per_weight_fp16_scales']:>7.3f} "
                  f"{r['float_file_bytes'] / q['file_bytes']:>7.2f}x")
    print("  bits/w = (file − float tensors)·8 / quantized weights: codes, scales and headers")
    print("\n(b) resident tensor bytes of the loaded model")
    for mid, r in result["models"].items():
        if "skipped" in r:
            continue
        cells = ", ".join(f"{q['bits']}-bit {q['loaded_tensor_bytes']} B ({q['loaded_vs_float_memory']:.3f}×)"
                          for q in r["quantized"])
        print(f"  {mid:<18} float {r['float_tensor_bytes']} B; {cells}")
    print("\n(c) speed, medians")
    lay = result["layer"]
    speed_table(f"  one {lay['shape'][0]}x{lay['shape'][1]} Linear layer", lay)
    for mid, r in result["models"].items():
        if "skipped" not in r:
            speed_table(f"  {mid}, whole model", r["speed"])
    print(f"\n  torchao: {lay['torchao']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out} ({result['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
