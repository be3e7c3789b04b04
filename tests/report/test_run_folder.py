"""Run folders: strict metrics.json, CSV, plots, whole-or-nothing folders, and reproducible metrics."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os

import pytest
import torch

from specquant.cli import main
from specquant.io.files import read_json
from specquant.report import run_folder as rf

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_metrics_json_is_strict_and_volatile_keys_are_stripped(tmp_path):
    obj = {"a": math.inf, "b": [1.5, float("nan")], "t": torch.tensor([1, 2]), "shape": (3, 4),
           "quant_seconds": 1.0, "layers": [{"name": "fc1", "seconds": 0.1, "kappa": math.inf}]}
    rf.write_run_folder(tmp_path, config={}, metrics=obj, layers=[])
    back = json.loads((tmp_path / rf.METRICS_JSON).read_text())  # parses: no Infinity/NaN tokens
    assert back["a"] is None and back["b"] == [1.5, None] and back["t"] == [1, 2] and back["shape"] == [3, 4]
    assert "Infinity" not in (tmp_path / rf.METRICS_JSON).read_text()
    stripped = rf.strip_volatile(back)
    assert "quant_seconds" not in stripped and stripped["layers"] == [{"name": "fc1", "kappa": None}]


def test_csv_rows_shapes_and_missing_values(tmp_path):
    rows = [{"name": "fc1", "shape": [128, 64], "err": 0.5, "kappa": math.inf},
            {"name": "fc2", "shape": [10, 64], "err": None, "extra": 1}]
    rf.write_csv(tmp_path / "layers.csv", rows)
    with open(tmp_path / "layers.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["name", "shape", "err", "kappa", "extra"]
    assert got[0]["shape"] == "128x64" and got[0]["kappa"] == "inf" and got[0]["extra"] == ""
    assert got[1]["err"] == "" and got[1]["extra"] == "1"


def test_plots_are_png(tmp_path):
    runs = [{"method": m, "bits": b, "bits_per_weight": b + 0.4 + i * 0.01, "accuracy": 90 + b + i}
            for i, m in enumerate(["rtn", "gpfq"]) for b in (2, 3, 4)]
    assert rf.plot_accuracy_vs_bits(runs, 97.5)[:8] == PNG_MAGIC
    png = rf.plot_layers(["fc1", "fc2"], {"rtn": [0.2, None], "gpfq": [0.1, 0.05]}, [10.0, math.inf])
    assert png[:8] == PNG_MAGIC
    sweep = {"bits": 2, "redundancy": [1.0, 2.0], "overall": [0.5, 0.25], "bits_per_weight": [2.2, 4.2],
             "layers": {"fc1": [0.5, 0.25]}}
    assert rf.plot_frame_redundancy([sweep])[:8] == PNG_MAGIC


def test_write_run_folder_writes_every_file(tmp_path):
    layers = [{"name": "fc1", "shape": [4, 4], "rel_output_error": 0.1, "kappa": 2.0, "seconds": 0.01}]
    metrics = {"model": "m", "method": "rtn", "bits": 4, "accuracy": 90.0, "layers": layers}
    png = rf.plot_layers(["fc1"], {"rtn": [0.1]}, [2.0])
    out = rf.write_run_folder(tmp_path / "run", config={"seed": 0}, metrics=metrics, layers=layers,
                              plots={"layers.png": png})
    assert sorted(os.listdir(out)) == ["config.json", "index.html", "layers.csv", "layers.png", "metrics.json"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "layers.png").read_bytes() == png


def test_same_command_same_seed_reproduces_metrics_json(tmp_path, capsys):
    """Two runs of the same quantize command: metrics.json equal once the timing keys are removed."""
    args = ["quantize", "digits-mlp", "--method", "spfq", "--bits", "2", "--calib", "128", "--seed", "3", "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(args + ["--out", str(a)]) == 0
    assert main(args + ["--out", str(b)]) == 0
    capsys.readouterr()
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert ma["seed"] == 3 and ma["quant_seconds"] > 0  # timings are there, under their own keys
    assert rf.strip_volatile(ma) == rf.strip_volatile(mb)
    # The packed models are byte for byte the same too.
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    # And the config says how to rerun it, seed included.
    config = json.loads((a / "config.json").read_text())
    assert config["seed"] == 3 and "--seed 3" in config["command_line"]


# ---------------------------------------------------------------------------------------------
# RunFolder: whole or nothing; verify_run_folder: the files belong together
# ---------------------------------------------------------------------------------------------


def _write_stamped(run: rf.RunFolder, model: bytes = b"model bytes") -> dict:
    (run.path / rf.MODEL_FILE).write_bytes(model)
    stamp = run.stamp()
    rf.write_run_folder(run.path, config={"seed": 0, **stamp}, metrics={"accuracy": 1.0, **stamp}, layers=[])
    return stamp


def test_run_folder_appears_only_when_complete(tmp_path):
    target = tmp_path / "run"
    with rf.RunFolder(target) as run:
        assert run.path.parent == tmp_path and run.path.name.startswith(".run.partial-")
        stamp = _write_stamped(run)
        assert not target.exists()  # nothing under the final name until the end
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert {"config.json", "metrics.json", "layers.csv", "index.html", "model.safetensors"} == set(os.listdir(target))
    assert stamp["model_sha256"] == hashlib.sha256(b"model bytes").hexdigest() and len(stamp["run_id"]) == 32
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_run_folder_is_removed_when_the_run_fails(tmp_path, exc):
    with pytest.raises(type(exc)), rf.RunFolder(tmp_path / "run") as run:
        _write_stamped(run)
        raise exc
    assert os.listdir(tmp_path) == []


def test_non_empty_target_is_refused_before_anything_is_created(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(rf.RunFolderError, match="not empty.*--overwrite"):
        rf.RunFolder(target)
    assert os.listdir(tmp_path) == ["run"] and os.listdir(target) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(rf.RunFolderError, match="not a folder"):
        rf.RunFolder(tmp_path / "file", overwrite=True)


def test_overwrite_swaps_the_old_folder_only_at_the_end(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), rf.RunFolder(target, overwrite=True) as run:
        _write_stamped(run)
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["run"] and os.listdir(target) == ["old.txt"]  # a failed run: old intact
    with rf.RunFolder(target, overwrite=True) as run:
        _write_stamped(run)
        assert (target / "old.txt").is_file()  # still there while the new run works
    assert os.listdir(tmp_path) == ["run"]
    assert "old.txt" not in os.listdir(target) and (target / "metrics.json").is_file()


def test_overwrite_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "x").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rf.RunFolderError, match="current folder"):
        rf.RunFolder(".", overwrite=True)
    assert os.listdir(tmp_path) == ["x"]


def test_the_second_of_two_runs_into_one_target_fails_and_the_first_stays_whole(tmp_path):
    target = tmp_path / "run"
    a, b = rf.RunFolder(target), rf.RunFolder(target)
    with pytest.raises(rf.RunFolderError, match="another run"), a:
        _write_stamped(a, b"model A")
        with b:
            stamp_b = _write_stamped(b, b"model B")
    assert os.listdir(tmp_path) == ["run"]
    assert (target / rf.MODEL_FILE).read_bytes() == b"model B"
    assert read_json(target / rf.METRICS_JSON)["run_id"] == stamp_b["run_id"]
    assert rf.verify_run_folder(target) is True


def test_file_sha256_reads_in_chunks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert rf.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert rf.file_sha256(tmp_path / "f", chunk_bytes=7) == hashlib.sha256(data).hexdigest()


def test_verify_run_folder_names_the_file_that_does_not_belong(tmp_path):
    folders = {}
    for name, model in (("a", b"model A"), ("b", b"model B")):
        with rf.RunFolder(tmp_path / name) as run:
            _write_stamped(run, model)
        folders[name] = tmp_path / name
    assert rf.verify_run_folder(folders["a"]) is True
    # A model copied in from another run.
    (folders["a"] / rf.MODEL_FILE).write_bytes(b"model B")
    with pytest.raises(rf.RunFolderError, match=r"model\.safetensors is not the model metrics\.json describes"):
        rf.verify_run_folder(folders["a"])
    (folders["a"] / rf.MODEL_FILE).write_bytes(b"model A")
    # metrics.json, then config.json, copied in from another run.
    for name in (rf.METRICS_JSON, rf.CONFIG_JSON):
        good = (folders["a"] / name).read_bytes()
        (folders["a"] / name).write_bytes((folders["b"] / name).read_bytes())
        with pytest.raises(rf.RunFolderError, match=f"inconsistent: {name} is from another run"):
            rf.verify_run_folder(folders["a"])
        (folders["a"] / name).write_bytes(good)
    # metrics.json missing while config.json is stamped.
    (folders["a"] / rf.METRICS_JSON).unlink()
    with pytest.raises(rf.RunFolderError, match=r"metrics\.json is missing"):
        rf.verify_run_folder(folders["a"])


def test_verify_run_folder_of_an_older_folder_is_false(tmp_path):
    (tmp_path / rf.MODEL_FILE).write_bytes(b"model")
    rf.write_run_folder(tmp_path, config={"seed": 0}, metrics={"accuracy": 1.0}, layers=[])
    assert rf.verify_run_folder(tmp_path) is False
