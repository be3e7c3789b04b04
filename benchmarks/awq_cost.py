"""Time and memory of the AWQ pre-step alone (``engine.awq.apply_awq``) on a zoo language model.

Loads the model, draws ``--calib`` calibration windows of ``--seq-len`` tokens (seed 0), runs the
AWQ search and folds for the chosen grid, and reports the seconds, the peak RSS during the step
(sampled every 0.2 s by a thread) and the RSS left after it returned.  Each repeat is a fresh
process; the table shows the medians.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/awq_cost.py --calib 8 --out bench-out/awq_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_run(model_id: str, calib: int, seq_len: int, bits: int, group: int, threads: int) -> dict:
    import torch

    import specquant as sq
    from specquant.engine.awq import apply_awq
    from specquant.models import get_entry

    torch.set_num_threads(threads)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.2)

    entry = get_entry(model_id)
    model = entry.load(None)
    batches = list(entry.calib(calib, 0, None, seq_len=seq_len).split(8))
    loaded = _rss_mb()
    threading.Thread(target=sample, daemon=True).start()
    cfg = sq.GPTQConfig(bits=bits, granularity=f"group:{group}", symmetric=False, awq=True)
    t0 = time.perf_counter()
    records = apply_awq(model, cfg, batches, batches[0][:2])
    seconds = time.perf_counter() - t0
    stop.set()
    return {"seconds": seconds, "rss_loaded_mb": loaded, "peak_rss_mb": max(peak[0], _rss_mb()),
            "rss_after_mb": _rss_mb(), "groups": len(records), "folded": sum(r.folded for r in records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out/awq_cost.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    from specquant.io.files import write_json

    if a.child:
        print(json.dumps(one_run(a.model, a.calib, a.seq_len, a.bits, a.group, a.threads)))
        return
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss_mb", "rss_after_mb")}
    result = {"model": a.model, "calib": a.calib, "seq_len": a.seq_len, "bits": a.bits, "group": a.group,
              "threads": a.threads, "runs": runs, "median": med}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), result)  # whole or nothing
    print("| model | calib × seq | seconds | peak RSS MB | RSS after MB | groups folded |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print(f"| {a.model} | {a.calib} × {a.seq_len} | {med['seconds']:.0f} | {med['peak_rss_mb']:.0f} | "
          f"{med['rss_after_mb']:.0f} | {runs[0]['folded']}/{runs[0]['groups']} |")


if __name__ == "__main__":
    main()
