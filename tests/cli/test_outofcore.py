"""``specquant quantize HF_FOLDER --max-memory SIZE``: the out-of-core path on the command line
(a tiny random Llama beside a word-level tokenizer, as in test_hf_folder.py)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from specquant.cli import main


def _write_folder(folder, data_dir):
    """test_hf_folder.py's folder writer (tests are not a package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("_hf_folder_helpers", Path(__file__).with_name("test_hf_folder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._write_folder(folder, data_dir)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("my-model")
    _write_folder(folder, data_dir)
    return folder


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_max_memory_run_writes_the_in_memory_file_and_its_json(hf_folder, data_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    common = ["--method", "gptq", "--bits", "4", "--granularity", "group:16", "--calib", "6", "--seq-len", "32",
              "--json", "--quiet", "--data-dir", str(data_dir)]
    assert main(["quantize", str(hf_folder), *common, "--max-memory", "4GB", "--out", str(tmp_path / "ooc")]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("command", "model", "method", "bits", "granularity", "bits_per_weight", "n_calib", "num_weights",
                "quant_seconds", "total_seconds", "peak_rss_mb", "max_memory_mb", "memory_estimate_mb", "spilled_mb",
                "blocks", "block_seconds", "layers", "run_id", "model_sha256"):
        assert key in res, key
    assert res["out_of_core"] is True and res["max_memory_mb"] == pytest.approx(4e9 / 2**20, abs=0.1)
    assert 0 < res["peak_rss_mb"] and res["blocks"] == 2 and len(res["layers"]) == 14
    assert res["memory_estimate_mb"]["total"] <= res["max_memory_mb"]
    assert sorted(p.name for p in (tmp_path / "ooc").iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    assert main(["quantize", str(hf_folder), *common, "--eval-windows", "2", "--out", str(tmp_path / "mem")]) == 0
    mem = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in mem["layers"]] == [r["name"] for r in res["layers"]]
    a, b = _tensors(tmp_path / "ooc" / "model.safetensors"), _tensors(tmp_path / "mem" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size,msg", [("3XB", "--max-memory: memory size '3XB' is not a number with a unit"),
                                      ("1MB", "--max-memory 1 MiB cannot be met: this model needs about")])
def test_bad_or_too_small_limits_are_one_line(hf_folder, data_dir, tmp_path, capsys, size, msg):
    assert main(["quantize", str(hf_folder), "--method", "rtn", "--bits", "4", "--max-memory", size,
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_max_memory_needs_a_folder(capsys):
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--bits", "4", "--max-memory", "1GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-memory reads a Hugging Face model folder" in err and len(err.splitlines()) == 1
