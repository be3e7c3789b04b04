"""The loader against many generated corruptions of real saved files.

Saves ``digits-mlp`` (trained on the fly, no data directory) quantized seven ways (RTN 3-bit,
GPFQ ternary, asymmetric 4-bit with fp16 scales, per-row widths, frame, GPTQ in groups of 24 with
a shorter last group and float16 scales, float) and, when the data
directory is there, ``resnet20-cifar10`` at 3 bits; then feeds ``specquant.load`` corruptions
from ``specquant.io.corrupt.mutate`` (truncations, byte flips, header edits with a recomputed
checksum, tensor and table edits, hostile entry points) and counts what happened:

- clear: a one-line ``SQFormatError``;
- loaded: the file loaded and the model ran with finite outputs (a harmless edit, e.g. of meta);
- other: anything else (a crash, another exception type, a multi-line error, non-finite
  outputs) — each is listed, and any makes the exit status 1.

    .venv/bin/python benchmarks/fuzz_loader.py [--cases 20000] [--seed 0] [--out bench-out/fuzz_loader.json]

The test suite runs the same generator with a few thousand cases (tests/io/test_fuzz.py).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from specquant.algorithms import GPFQConfig, GPTQConfig, ModuleSettings, RTNConfig
from specquant.algorithms.frame import FrameConfig
from specquant.engine.apply import quantize
from specquant.io import load, save
from specquant.io.corrupt import mutate, outcome
from specquant.models import get_model
from specquant.models.data import DataNotFoundError


def base_files(folder: Path, data_dir) -> dict[str, tuple[bytes, torch.Tensor]]:
    """name -> (bytes of a good saved file, an input batch for its model)."""
    model, entry = get_model("digits-mlp")
    calib = entry.calib(128, 0, None)
    configs = {
        "digits-rtn3": RTNConfig(bits=3),
        "digits-gpfq2-trits": GPFQConfig(bits=2),
        "digits-asym4": RTNConfig(bits=4, symmetric=False),
        "digits-rows": RTNConfig(bits=4, modules={"fc2": ModuleSettings(row_bits=tuple([2, 3, 4, 4] * 16))}),
        "digits-frame": FrameConfig(bits=2),
        "digits-gptq4-group24-fp16": GPTQConfig(bits=4, granularity="group:24", symmetric=False, scale_dtype="fp16"),
        "digits-float": None,
    }
    out = {}
    for name, cfg in configs.items():
        m = copy.deepcopy(model)
        if cfg is not None:
            quantize(m, cfg, calib=calib, progress=False)
        opts = {"scale_dtype": "fp16"} if name == "digits-asym4" else {}
        path = save(m, folder / f"{name}.sq", model_id="digits-mlp", **opts)
        out[name] = (path.read_bytes(), calib[:4])
    try:
        r20, rentry = get_model("resnet20-cifar10", data_dir)
    except DataNotFoundError as e:
        print(f"[fuzz_loader] resnet20-cifar10 left out: {e}", file=sys.stderr)
        return out
    x = rentry.calib(64, 0, data_dir)
    quantize(r20, RTNConfig(bits=3), calib=x, progress=False)
    out["resnet20-rtn3"] = (save(r20, folder / "r20.sq", model_id="resnet20-cifar10").read_bytes(), x[:2])
    return out


def _fuzz_one(name, data, x, n, seed_value, path, counts, by_family, failures) -> None:
    """``n`` corruptions of one file, counted into ``counts`` and ``by_family``."""

    @seed(seed_value)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(d):
        label, bad = mutate(d.draw, data)
        path.write_bytes(bad)
        res = outcome(path, load, x, label)
        counts[res.kind] += 1
        by_family[label.split(":")[0].split(" ")[0]][res.kind] += 1
        if res.kind == "other":
            failures.append({"file": name, "mutation": label, "what": res.message})

    one()


def run(files: dict, cases: int, seed_value: int, folder: Path) -> dict:
    per_file = max(1, cases // len(files))
    counts = collections.Counter()
    by_family: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    path = folder / "bad.sq"
    for i, (name, (data, x)) in enumerate(sorted(files.items())):
        _fuzz_one(name, data, x, per_file, seed_value * 1000 + i, path, counts, by_family, failures)
    return {"counts": dict(counts), "by_family": {k: dict(v) for k, v in sorted(by_family.items())},
            "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000, help="corruptions in all (default 20000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    ap.add_argument("--data-dir", default=None, help="data directory (for resnet20-cifar10)")
    ap.add_argument("--out", default="bench-out/fuzz_loader.json", help="JSON result")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sq-fuzz-") as tmp:
        files = base_files(Path(tmp), args.data_dir)
        res = run(files, args.cases, args.seed, Path(tmp))
    res.update({"files": sorted(files), "cases_requested": args.cases, "seed": args.seed,
                "seconds": time.perf_counter() - t0, "threads": 1})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    c = res["counts"]
    tried = sum(c.values())
    print(f"{'family':<10} {'tried':>7} {'clear':>7} {'loaded':>7} {'other':>6}")
    for fam, v in res["by_family"].items():
        print(f"{fam:<10} {sum(v.values()):>7} {v.get('clear', 0):>7} {v.get('loaded', 0):>7} {v.get('other', 0):>6}")
    print(f"{'all':<10} {tried:>7} {c.get('clear', 0):>7} {c.get('loaded', 0):>7} {c.get('other', 0):>6}"
          f"   ({res['seconds']:.0f} s, 1 thread, files: {', '.join(res['files'])})")
    for f in res["failures"][:20]:
        print(f"FAIL {f['file']}: {f['mutation']}: {f['what']}")
    return 1 if c.get("other") else 0


if __name__ == "__main__":
    sys.exit(main())
