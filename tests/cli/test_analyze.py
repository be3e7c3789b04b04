"""``specquant analyze``: the per-layer diagnostics as JSON and a run folder."""
from __future__ import annotations

import json

from specquant.cli import main


def test_analyze_writes_the_diagnostics_and_the_run_folder(capsys, tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", "digits-mlp", "--json", "--quiet", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "digits-mlp" and [r["name"] for r in res["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(r["kappa"] >= 1.0 for r in res["layers"])
    for name in ("metrics.json", "layers.csv", "layers.png", "index.html", "config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == res  # the file holds what --json printed
    assert res["end_to_end"] is None and res["n_calib"] == 0  # no --calib: weights only


def test_analyze_with_calibration_data_reports_the_end_to_end_bound(capsys):
    assert main(["analyze", "digits-mlp", "--calib", "64", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    e2e = res["end_to_end"]
    assert res["n_calib"] == 64 and e2e["n_samples"] == 64 and e2e["kind"] == "chain"
    assert e2e["holds"] is True and e2e["bound_max"] >= e2e["measured_max"] > 0
