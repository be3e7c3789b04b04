"""``specquant demo``: every method at 2, 3 and 4 bits, and a run folder that appears whole or not at all."""
from __future__ import annotations

import json
import os
import re

import specquant.cli.demo as demo
from specquant.algorithms import method_names
from specquant.cli import main


def test_demo_quantizes_every_method_at_2_3_4_bits(tmp_path, capsys, contract_keys, request):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--calib", "128", "--json"]) == 0
    captured = capsys.readouterr()
    m = json.loads(captured.out)
    runs = {(r["method"], r["bits"]): r for r in m["runs"]}
    assert set(runs) == {(meth, b) for meth in method_names() for b in (2, 3, 4)}
    for r in runs.values():
        assert contract_keys <= set(r)
        assert (out / r["file"]).is_file()
        assert r["bits_per_weight"] > r["bits"]
    assert runs[("frame", 2)]["redundancy"] == demo.DEMO_REDUNDANCY
    # The 4-bit data-driven methods stay within 3 points of the float model.
    for meth in ("rtn", "gpfq", "gptq"):
        assert runs[(meth, 4)]["accuracy"] >= m["float_accuracy"] - 3.0
    for name in ("accuracy_vs_bits.png", "layers.png", "frame_redundancy.png", "index.html", "metrics.json",
                 "config.json", "layers.csv"):
        assert (out / name).is_file(), name
    # The table on stderr lists every method.
    for meth in method_names():
        assert re.search(rf"^[★◆ ]*{meth} ", captured.err, re.M), meth  # after the ★/◆ mark column
    # The language model (the data directory is there: conftest fails under CI otherwise).
    request.getfixturevalue("data_dir")  # skips here without it (fails under CI)
    lm = {r["bits"]: r for r in m["language_model"]}
    assert set(lm) == {32, 2, 3, 4} and m["language_model_skipped"] is None
    for b in (2, 3, 4):
        assert (out / lm[b]["file"]).is_file() and lm[b]["bits_per_weight"] > b
        assert lm[b]["float_perplexity"] == lm[32]["perplexity"] and lm[b]["sample"]
    assert lm[4]["perplexity"] < 1.1 * lm[32]["perplexity"]  # 4 bits stays close to float
    assert lm[2]["perplexity"] > lm[4]["perplexity"]
    assert "Language model: stories260k" in (out / "index.html").read_text(encoding="utf-8")


def test_a_failed_demo_leaves_nothing_under_runs(capsys, tmp_path, monkeypatch):
    """The demo's default runs/demo-<timestamp> is built the same way: a failure leaves nothing."""
    monkeypatch.chdir(tmp_path)
    real_save = demo.save_and_measure

    def save_then_fail(model, model_id, path, meta):
        real_save(model, model_id, path, meta)  # the first packed model is saved ...
        raise RuntimeError("out of disk")  # ... then the run fails

    monkeypatch.setattr(demo, "save_and_measure", save_then_fail)
    assert main(["demo", "--calib", "64", "--quiet"]) == 2
    assert "out of disk" in capsys.readouterr().err
    assert os.listdir(tmp_path / "runs") == []
