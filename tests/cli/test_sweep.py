"""``specquant sweep``: every (method, width, seed) run as ``specquant quantize`` would run it, one
table and JSON with the Pareto front and the recommendation per seed; over 2 ranks the same
scores and sizes; the options after '--' checked by quantize's own parser, one line each."""
import json
import os
import subprocess
import sys

import pytest

from specquant.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ARGV = ["sweep", "digits-mlp", "--methods", "rtn", "gptq", "--bits", "2", "3", "--seeds", "0", "1", "--json",
        "--quiet", "--", "--calib", "128", "--limit", "80"]
SAME = ("method", "bits", "seed", "accuracy", "float_accuracy", "bits_per_weight", "size_vs_float", "pareto",
        "recommended", "change")


@pytest.fixture(scope="module")
def one_process():
    """The sweep in a fresh process, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "specquant", *ARGV], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_each_run_is_the_quantize_run_with_its_options(one_process, capsys):
    res = one_process
    assert res["command"] == "sweep" and res["score"] == "accuracy"
    assert [(r["method"], r["bits"], r["seed"]) for r in res["runs"]] == [
        (m, b, s) for m in ("rtn", "gptq") for b in (2, 3) for s in (0, 1)]
    for method, bits, seed in (("gptq", 3, 1), ("rtn", 2, 0)):
        assert main(["quantize", "digits-mlp", "--method", method, "--bits", str(bits), "--seed", str(seed),
                     "--calib", "128", "--limit", "80", "--json", "--quiet"]) == 0
        q = json.loads(capsys.readouterr().out)
        row = next(r for r in res["runs"] if (r["method"], r["bits"], r["seed"]) == (method, bits, seed))
        for k in ("accuracy", "float_accuracy", "bits_per_weight", "size_vs_float"):
            assert row[k] == q[k], k


def test_pareto_and_recommendation_are_per_seed(one_process):
    res = one_process
    assert [r["seed"] for r in res["recommended"]] == [0, 1]
    for rec in res["recommended"]:
        group = [r for r in res["runs"] if r["seed"] == rec["seed"]]
        assert sum(r["recommended"] for r in group) == 1
        chosen = group[rec["index"]]
        assert chosen == rec["run"] and chosen["pareto"]
        for r in group:
            assert r["change"] == pytest.approx(r["accuracy"] - r["float_accuracy"])
            # a run is off the front exactly when another one of its seed is no larger and no worse, and better in one
            dominated = any(o is not r and o["bits_per_weight"] <= r["bits_per_weight"]
                            and o["accuracy"] >= r["accuracy"]
                            and (o["bits_per_weight"] < r["bits_per_weight"] or o["accuracy"] > r["accuracy"])
                            for o in group)
            assert r["pareto"] == (not dominated)


def test_two_ranks_give_the_table_of_one_process(one_process, capsys):
    argv = ARGV[:ARGV.index("--")] + ["--nproc", "2"] + ARGV[ARGV.index("--"):]
    assert main(argv) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["nproc"] == 2 and two["comm_bytes"] > 0
    assert [{k: r[k] for k in SAME} for r in two["runs"]] == [{k: r[k] for k in SAME} for r in one_process["runs"]]
    assert [r["index"] for r in two["recommended"]] == [r["index"] for r in one_process["recommended"]]


@pytest.mark.parametrize("argv, match", [
    (["sweep", "digits-mlp", "--methods", "rtn", "--bits", "2", "--", "--out", "x"], "sweep: --out after '--' is set"),
    (["sweep", "digits-mlp", "--methods", "rtn", "--bits", "2", "--", "--bits=3"], "sweep: --bits after '--'"),
    (["sweep", "digits-mlp", "--methods", "rtn", "--bits", "2", "--", "--granularity", "bogus"],
     "quantize: argument --granularity"),
    (["sweep", "digits-mlp", "--methods", "rtn", "--bits", "9"], "bits must be an integer from 1 to 8, got 9"),
    (["quantize", "digits-mlp", "--method", "rtn", "--bits", "2", "--", "--calib", "64"], "unexpected '--'"),
])
def test_bad_sweeps_are_one_line(error_line, argv, match):
    assert match in error_line(argv)
