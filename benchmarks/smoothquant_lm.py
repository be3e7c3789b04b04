"""SmoothQuant and W8A8 on a language model: perplexity with 8-bit weights and 8-bit activations.

The language-model protocol (BENCHMARKS.md, "Language model against Brevitas"): the zoo model
(default smollm2-135m), calibration windows of --seq-len tokens of the WikiText-2 validation text
at seeded offsets (--calib, seed 0), perplexity on the first --eval-windows windows of the test
text.  Every Linear of the decoder blocks is quantized (lm_head, tied to the embedding, stays
float, as in llm_vs_peers.py): weights per-output-channel narrow symmetric (--wbits, default 8)
by RTN or GPTQ; activations (--abits, default 8) at the input of every quantized layer, either
static per tensor (asymmetric, range from --act-calibrator on the calibration inputs of the
partly quantized model) or per token (each row's asymmetric min-max range at run time), each with
and without SmoothQuant (Xiao et al., ICML 2023) at the given α.  The float model and weight-only
runs are scored in the same run.

A run is "METHOD:ACT[:sqALPHA]" with METHOD rtn | gptq, ACT none | tensor | token, e.g.
"gptq:tensor:sq0.5".  Perplexity is deterministic (one run each); the seconds are single
measurements.  The JSON is rewritten after every run, so a stopped benchmark keeps what it did.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/smoothquant_lm.py --out bench-out/smoothquant_lm.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/smoothquant_lm.py --model stories260k --seq-len 256 \\
        --calib 16 --eval-windows 40 --wbits 4 --out bench-out/smoothquant_stories.json
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

DEFAULT_RUNS = ["rtn:none", "rtn:tensor", "rtn:tensor:sq0.5", "rtn:token", "rtn:token:sq0.5",
                "gptq:tensor", "gptq:tensor:sq0.5", "gptq:token:sq0.5"]


@dataclass(frozen=True)
class Run:
    """One benchmark setting."""

    method: str  # "rtn" | "gptq"
    act: str  # "none" (weight-only) | "tensor" | "token"
    alpha: float | None  # SmoothQuant α, or None

    @property
    def label(self) -> str:
        return f"{self.method}:{self.act}" + ("" if self.alpha is None else f":sq{self.alpha:g}")


def parse_run(text: str) -> Run:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("rtn", "gptq") or parts[1] not in ("none", "tensor", "token"):
        raise argparse.ArgumentTypeError(f"run must be METHOD:ACT[:sqALPHA] (rtn|gptq, none|tensor|token), "
                                         f"got {text!r}")
    alpha = None
    if len(parts) == 3:
        if not parts[2].startswith("sq"):
            raise argparse.ArgumentTypeError(f"the third part must be sqALPHA, got {parts[2]!r}")
        alpha = float(parts[2][2:])
    return Run(parts[0], parts[1], alpha)


def config_of(run: Run, args):
    from specquant.algorithms import ModuleSettings, make_config

    extra = {}
    if run.act != "none":
        extra.update(act_bits=args.abits, act_calibrator=args.act_calibrator, act_granularity=run.act)
    if run.alpha is not None:
        extra["smoothquant"] = run.alpha
    return make_config(run.method, bits=args.wbits, granularity="channel", symmetric=True, seed=args.seed,
                       modules={"lm_head": ModuleSettings(skip=True)}, **extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zoo id of a language model (default smollm2-135m)")
    p.add_argument("--calib", type=int, default=64, help="calibration windows (default 64, the protocol's)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=int, default=40, help="first test windows scored (default 40)")
    p.add_argument("--wbits", type=int, default=8, help="weight bits (default 8)")
    p.add_argument("--abits", type=int, default=8, help="activation bits (default 8)")
    p.add_argument("--act-calibrator", default="mse", help="static per-tensor ranges: calibrator (default mse)")
    p.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run(r) for r in DEFAULT_RUNS],
                   help="METHOD:ACT[:sqALPHA] entries (default: " + " ".join(DEFAULT_RUNS) + ")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="calibration windows per forward pass (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", default=None, help="the data directory (default: the configured one)")
    p.add_argument("--out", default="bench-out/smoothquant_lm.json")
    args = p.parse_args(argv)

    import specquant as sq
    from specquant.eval.perplexity import perplexity
    from specquant.io.files import write_json
    from specquant.models import get_model

    torch.set_num_threads(args.threads)
    model, entry = get_model(args.model, args.data_dir)
    if entry.kind != "lm":
        raise SystemExit(f"{args.model} is not a language model")
    model.eval()
    ids, _ = entry.test(args.data_dir)
    calib = entry.calib(args.calib, args.seed, args.data_dir, seq_len=args.seq_len)
    meta = {"model": args.model, "calib_windows": args.calib, "seq_len": args.seq_len,
            "eval_windows": args.eval_windows, "seed": args.seed, "wbits": args.wbits, "abits": args.abits,
            "act_calibrator": args.act_calibrator, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "specquant": sq.__version__, "argv": sys.argv[1:]}
    out = {"meta": meta, "float": None, "runs": []}

    t0 = time.perf_counter()
    f = perplexity(model, ids, args.seq_len, args.eval_windows)
    out["float"] = {"ppl": f.perplexity, "tokens": f.tokens, "predicted_tokens": f.predicted,
                    "eval_seconds": time.perf_counter() - t0}
    write_json(args.out, out)
    print(f"float ppl {f.perplexity:.3f} ({f.tokens} tokens, {time.perf_counter() - t0:.0f} s)", flush=True)

    for run in args.runs:
        m = copy.deepcopy(model)
        config = config_of(run, args)
        t0 = time.perf_counter()
        report = sq.quantize(m, config, calib=calib, batch_size=args.batch, progress=False)
        qs = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = perplexity(m, ids, args.seq_len, args.eval_windows)
        es = time.perf_counter() - t0
        folded = [g for g in report.smoothquant if g.folded]
        rec = {"run": run.label, "method": run.method, "act_granularity": run.act, "smoothquant": run.alpha,
               "ppl": r.perplexity, "ppl_vs_float": r.perplexity / f.perplexity, "quant_seconds": qs,
               "eval_seconds": es, "layers": len(report.layers), "config": config.to_dict(),
               "smoothquant_groups_folded": len(folded), "smoothquant_groups": len(report.smoothquant),
               "act_max_before": max((g.act_max for g in folded), default=None),
               "act_max_after": max((g.act_max_after for g in folded), default=None),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        out["runs"].append(rec)
        write_json(args.out, out)
        print(f"{run.label:<20} ppl {r.perplexity:9.3f}  ×float {rec['ppl_vs_float']:.4f}  quant {qs:5.0f} s  "
              f"eval {es:4.0f} s  SQ groups folded {len(folded)}/{len(report.smoothquant)}", flush=True)
        del m

    print()
    print(f"{args.model}: W{args.wbits}A{args.abits}, calib {args.calib}×{args.seq_len}, "
          f"{args.eval_windows} test windows, {torch.get_num_threads()} thread(s)")
    print("| run | ppl | × float | quant s | eval s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| float | {f.perplexity:.2f} | 1.000 | – | {out['float']['eval_seconds']:.0f} |")
    for rec in out["runs"]:
        print(f"| {rec['run']} | {rec['ppl']:.2f} | {rec['ppl_vs_float']:.3f} | {rec['quant_seconds']:.0f} | "
              f"{rec['eval_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
