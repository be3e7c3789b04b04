"""The merging and goal checks of ``benchmarks/llm_vs_peers.py --table`` (no model is run)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_vs_peers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("llm_vs_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


META = {"model": "m", "calib": 64, "seq_len": 512, "eval_windows": 40, "full_eval": False, "seed": 0,
        "batch": 8, "threads": 1, "brevitas_sequential": False, "versions": {"brevitas": "0.13.4", "torch": "2"}}
FLOAT = {"ppl": 30.0, "windows": 40, "seq_len": 512}


def _run(grid, tool, method, ppl, s=100.0, mb=1000.0):
    return {"grid": grid, "tool": tool, "method": method, "ppl": ppl, "quant_seconds": s, "peak_rss_mb": mb}


def _write(path, runs, meta=META, float_rec=FLOAT):
    path.write_text(json.dumps({"meta": meta, "float": float_rec, "runs": runs, "skipped": []}))
    return str(path)


def test_goals_from_runs_merged_over_files(bench, tmp_path):
    a = _write(tmp_path / "a.json", [_run("w3g128a", "specquant", "qronos", 45.0, s=1000, mb=2900),
                                     _run("w3g128a", "specquant", "gptq", 46.0),
                                     _run("w3g128a", "brevitas", "gptq", 70.0, s=9000, mb=4000)])
    b = _write(tmp_path / "b.json", [_run("w3g128a", "brevitas", "rtn", 150.0),
                                     _run("w3g128a", "brevitas", "gpfq", 60.0),
                                     _run("w4c", "brevitas", "gptq", 35.0),
                                     _run("w3g128a", "specquant", "gptq", 46.0)])  # same run, same ppl: merged
    float_rec, runs = bench.merge_results([a, b])
    assert len(runs) == 6 and {r["source"] for r in runs} == {a, b}
    rows = {g["grid"]: g for g in bench.goals(float_rec, runs)}
    w3 = rows["w3g128a"]
    assert w3["specquant_best"] == "qronos" and w3["brevitas_best"] == "gpfq" and w3["brevitas_missing"] == ["qronos"]
    assert w3["best_below_brevitas_best"] is None  # Brevitas Qronos not run: undecided
    assert w3["gap_ratio_vs_brevitas_gptq"] == pytest.approx((45 - 30) / (70 - 30))
    assert w3["time_ratio_vs_brevitas_gptq"] == pytest.approx(1000 / 9000)
    assert w3["rss_ratio_vs_brevitas_gptq"] == pytest.approx(2900 / 4000) and w3["gap_goal_applies"]
    assert rows["w4c"]["specquant_best"] is None and rows["w4c"]["gap_ratio_vs_brevitas_gptq"] is None
    c = _write(tmp_path / "c.json", [_run("w3g128a", "brevitas", "qronos", 44.0)])
    rows = {g["grid"]: g for g in bench.goals(*bench.merge_results([a, b, c]))}
    assert rows["w3g128a"]["best_below_brevitas_best"] is False and rows["w3g128a"]["brevitas_missing"] == []


def test_merge_refuses_other_protocols_and_disagreeing_runs(bench, tmp_path):
    a = _write(tmp_path / "a.json", [_run("w4c", "specquant", "gptq", 40.0)])
    other = _write(tmp_path / "o.json", [], meta={**META, "calib": 8})
    with pytest.raises(ValueError, match="calib = 8"):
        bench.merge_results([a, other])
    fl = _write(tmp_path / "f.json", [], float_rec={**FLOAT, "ppl": 31.0})
    with pytest.raises(ValueError, match="float perplexity 31.0"):
        bench.merge_results([a, fl])
    clash = _write(tmp_path / "c.json", [_run("w4c", "specquant", "gptq", 41.0)])
    with pytest.raises(ValueError, match="specquant:gptq on w4c is in .*a.json"):
        bench.merge_results([a, clash])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a JSON of this script"):
        bench.merge_results([str(tmp_path / "x.json")])
