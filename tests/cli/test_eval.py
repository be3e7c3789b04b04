"""``specquant eval``: a run folder, a saved file or a zoo id; a run folder's files must belong together."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import specquant.io
from specquant.cli import main


def test_eval_of_the_run_folder_reproduces_the_accuracy(gpfq_run, run_cli):
    _, out = gpfq_run
    metrics = json.loads((out / "metrics.json").read_text())
    proc = run_cli("eval", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["accuracy"] == metrics["accuracy"]
    assert res["matches_recorded"] is True and res["quantized"] is True
    assert res["bits_per_weight"] == pytest.approx(metrics["bits_per_weight"])
    # The file itself evaluates the same.
    proc = run_cli("eval", str(out / "model.safetensors"), "--json", "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout)["accuracy"] == metrics["accuracy"]


def test_eval_of_a_zoo_id_gives_the_float_accuracy(gpfq_run, capsys):
    metrics = json.loads((gpfq_run[1] / "metrics.json").read_text())
    assert main(["eval", "digits-mlp", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "zoo" and res["quantized"] is False
    assert res["accuracy"] == res["float_accuracy"] == metrics["float_accuracy"]


def test_run_folder_records_run_id_and_model_sha256(two_runs):
    for out in two_runs:
        config = json.loads((out / "config.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        assert config["model_sha256"] == metrics["model_sha256"] == digest
        assert config["run_id"] == metrics["run_id"] and len(metrics["run_id"]) == 32
    assert json.loads((two_runs[0] / "metrics.json").read_text())["run_id"] != \
        json.loads((two_runs[1] / "metrics.json").read_text())["run_id"]


def test_eval_of_a_good_run_folder_is_verified(two_runs, eval_json):
    res = eval_json(two_runs[0])
    assert res["verified"] is True and res["matches_recorded"] is True


def test_eval_detects_a_model_from_another_run(tmp_path, two_runs, error_line):
    w4, w2 = two_runs
    folder = tmp_path / "w4"
    shutil.copytree(w4, folder)
    shutil.copyfile(w2 / "model.safetensors", folder / "model.safetensors")
    line = error_line(["eval", str(folder)])
    assert "inconsistent" in line and str(folder) in line
    assert "model.safetensors is not the model metrics.json describes (SHA-256 differs)" in line


def test_eval_detects_metrics_from_another_run(tmp_path, two_runs, error_line):
    w4, w2 = two_runs
    folder = tmp_path / "w4"
    shutil.copytree(w4, folder)
    shutil.copyfile(w2 / "metrics.json", folder / "metrics.json")
    line = error_line(["eval", str(folder)])
    assert "inconsistent" in line and "metrics.json is from another run" in line


def test_eval_of_an_older_run_folder_is_not_verified(tmp_path, two_runs, eval_json):
    folder = tmp_path / "old"
    shutil.copytree(two_runs[0], folder)
    for name in ("config.json", "metrics.json"):  # as an older specquant wrote them
        doc = json.loads((folder / name).read_text())
        del doc["run_id"], doc["model_sha256"]
        (folder / name).write_text(json.dumps(doc))
    res = eval_json(folder)
    assert res["verified"] is False and res["matches_recorded"] is True


def test_eval_passes_allow_entry_point_to_the_loader(two_runs, monkeypatch, error_line):
    real_load = specquant.io.load
    calls: list[dict] = []

    def recording_load(path, *args, **kwargs):
        calls.append(kwargs)
        return real_load(path)

    monkeypatch.setattr(specquant.io, "load", recording_load)
    model = str(two_runs[0] / "model.safetensors")
    assert main(["eval", model, "--quiet", "--allow-entry-point", "mypkg.models:build",
                 "--allow-entry-point", "other:make_net"]) == 0
    assert main(["eval", model, "--quiet"]) == 0
    assert [c.get("allow_entry_point", "not passed") for c in calls] == [["mypkg.models:build", "other:make_net"],
                                                                         None]
    line = error_line(["eval", model, "--allow-entry-point", "not an entry point"])
    assert "--allow-entry-point" in line and "MODULE:FUNCTION" in line
