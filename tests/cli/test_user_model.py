"""Your own model on the command line: ``quantize module:function --weights W --calib-data C
--eval-data E [--metric module:function]``, end to end to a run folder and ``eval``; data files
in .npz / .pt / .txt; did-you-mean, --version and the early option checks."""
from __future__ import annotations

import json
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from specquant._version import __version__
from specquant.cli import main
from specquant.cli.common import load_test_set
from specquant.io import read_header
from specquant.models import get_entry
from specquant.models.data import stratified_indices
from specquant.models.user import read_data_file

pytestmark = pytest.mark.usefixtures("one_thread")

USER_MODULE = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def agreement(outputs, targets):
    return float((outputs.argmax(dim=1) == targets).float().mean())
"""


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    """A user's module (a fresh name, on sys.path), its trained weights and data files; the
    evaluation targets are the float model's own predictions, so float accuracy is 100 %."""
    name = f"sq_user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    files = {"module": name, "weights": tmp_path / "w.safetensors", "calib": tmp_path / "calib.npz",
             "eval_pt": tmp_path / "eval.pt", "eval_txt": tmp_path / "eval.txt", "dir": tmp_path}
    save_file(model.state_dict(), str(files["weights"]))
    np.savez(files["calib"], x=x[:200].numpy())
    torch.save({"x": x[200:], "y": y[200:]}, files["eval_pt"])
    np.savetxt(files["eval_txt"], np.c_[x[200:].numpy(), y[200:].numpy()], header="8 inputs, then the label")
    yield files
    sys.modules.pop(name, None)


def _quantize_argv(u, out, *extra):
    return ["quantize", f"{u['module']}:build", "--weights", str(u["weights"]), "--calib-data", str(u["calib"]),
            "--eval-data", str(u["eval_pt"]), "--method", "gptq", "--bits", "4", "--calib", "128",
            "--out", str(out), "--json", "--quiet", *extra]


def test_user_model_end_to_end_to_a_run_folder_and_eval(user_model, tmp_path, capsys, error_line):
    out = tmp_path / "run"
    assert main(_quantize_argv(user_model, out)) == 0
    m = json.loads(capsys.readouterr().out)
    builder = f"{user_model['module']}:build"
    assert m["model"] == builder and m["float_accuracy"] == 100.0 and m["n_test"] == 200
    assert 90.0 <= m["accuracy"] <= 100.0 and m["n_calib"] == 128
    assert [r["name"] for r in m["layers"]] == ["0", "2"]
    # The file records the builder and the data files, never code.
    meta = read_header(out / "model.safetensors")["meta"]
    assert meta["user_model"]["builder"] == builder
    assert meta["user_model"]["eval_data"] == str(user_model["eval_pt"].resolve())
    config = json.loads((out / "config.json").read_text())
    assert config["weights"] == str(user_model["weights"]) and config["calib_data"] == str(user_model["calib"])
    # Loading it imports the builder only when the user allows exactly that name.
    line = error_line(["eval", str(out), "--quiet"])
    assert f"--allow-entry-point {builder}" in line
    assert main(["eval", str(out), "--allow-entry-point", builder, "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["accuracy"] == m["accuracy"] and r["matches_recorded"] is True and r["verified"] is True
    assert r["quantized"] is True and r["n_test"] == 200


def test_txt_eval_data_and_a_user_metric(user_model, tmp_path, capsys, error_line):
    out = tmp_path / "run-metric"
    metric = f"{user_model['module']}:agreement"
    argv = _quantize_argv(user_model, out, "--metric", metric)
    argv[argv.index(str(user_model["eval_pt"]))] = str(user_model["eval_txt"])
    assert main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["metric_name"] == metric and m["float_metric"] == 1.0 and 0.9 <= m["metric"] <= 1.0
    assert "accuracy" not in m  # the user's metric replaces top-1, under its own keys
    builder = f"{user_model['module']}:build"
    # The recorded metric is user code too: eval runs it only when allowed or named again.
    line = error_line(["eval", str(out), "--allow-entry-point", builder, "--quiet"])
    assert f"--metric {metric}" in line
    assert main(["eval", str(out), "--allow-entry-point", builder, "--metric", metric, "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["metric"] == m["metric"] and r["matches_recorded"] is True


def test_float_user_model_eval_and_the_console_script_imports_from_the_current_folder(
        user_model, monkeypatch, capsys):
    # The console script does not put the current folder on sys.path; the CLI does, for the
    # module the user names (as python -m does).
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user_model["dir"]))])
    monkeypatch.chdir(user_model["dir"])
    assert main(["eval", f"{user_model['module']}:build", "--weights", "w.safetensors", "--eval-data", "eval.txt",
                 "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["source"] == "builder" and r["quantized"] is False
    assert r["accuracy"] == r["float_accuracy"] == 100.0


@pytest.mark.parametrize("change, expected", [
    (("--eval-data", None), "give --eval-data FILE"),
    (("--calib-data", None), "give --calib-data FILE"),
    (("--eval-data", "missing.npz"), "--eval-data 'missing.npz': no such file"),
    (("--calib-data", "pyproject.csv"), "unknown format '.csv'"),
    (("module", "no_such_module_xyz:build"), "cannot import module 'no_such_module_xyz'"),
    (("module", "{module}:nothing"), "has no attribute 'nothing'"),
])
def test_user_model_errors_are_one_line(user_model, tmp_path, error_line, change, expected):
    argv = _quantize_argv(user_model, tmp_path / "never")
    key, value = change
    if key == "module":
        argv[1] = value.format(module=user_model["module"])
    else:
        i = argv.index(key)
        if value is None:
            del argv[i:i + 2]
        else:
            if value.endswith(".csv"):
                (tmp_path / value).write_text("1,2\n")
            argv[i + 1] = str(tmp_path / value) if value.endswith(".csv") else value
    line = error_line(argv)
    assert expected in line, line
    assert not (tmp_path / "never").exists()


def test_weights_that_do_not_fit_name_the_key(user_model, tmp_path, error_line):
    bad = tmp_path / "bad.safetensors"
    save_file({"0.weight": torch.zeros(32, 8)}, str(bad))
    argv = _quantize_argv(user_model, tmp_path / "never")
    argv[argv.index("--weights") + 1] = str(bad)
    line = error_line(argv)
    assert "bad.safetensors" in line and "'0.bias'" in line


def test_data_files_are_read_the_same_in_each_format(user_model):
    a = read_data_file(user_model["eval_pt"], labelled=True)
    b = read_data_file(user_model["eval_txt"], labelled=True)
    assert a.x.shape == b.x.shape == (200, 8) and torch.equal(a.y, b.y) and b.y.dtype == torch.int64
    assert torch.allclose(a.x, b.x, atol=1e-6)
    c = read_data_file(user_model["calib"], labelled=False)
    assert c.x.shape == (200, 8) and c.y is None


def test_bad_data_files_are_one_line_naming_the_file(tmp_path):
    p = tmp_path / "ragged.txt"
    p.write_text("1 2 3\n4 5\n")
    with pytest.raises(ValueError, match=r"ragged.txt:2: 2 numbers, but the first line has 3"):
        read_data_file(p, labelled=True)
    q = tmp_path / "nolabels.npz"
    np.savez(q, x=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"nolabels.npz.*no array 'y'"):
        read_data_file(q, labelled=True)
    r = tmp_path / "nan.npz"
    np.savez(r, x=np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match=r"nan.npz: 'x' holds NaN or inf \(sample 0\)"):
        read_data_file(r, labelled=False)


def test_zoo_model_with_your_own_test_file(user_model, tmp_path, capsys):
    """--eval-data replaces a zoo classifier's test set (digits-mlp: 64 inputs, 10 classes)."""
    x = torch.randn(60, 64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(60) % 10
    np.savez(tmp_path / "digits-test.npz", x=x.numpy(), y=y.numpy())
    out = tmp_path / "zoo-own-test"
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--bits", "8", "--calib", "64", "--eval-data",
                 str(tmp_path / "digits-test.npz"), "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n_test"] == 60
    # eval of the run folder scores the run's own test file again (recorded in config.json)
    assert main(["eval", str(out), "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_test"] == 60 and r["matches_recorded"] is True


def test_did_you_mean_and_version(error_line, capsys):
    assert "did you mean 'resnet20-cifar10'?" in error_line(["quantize", "resnet20-cifar", "--method", "rtn",
                                                              "--bits", "4"])
    assert "did you mean 'digits-mlp'?" in error_line(["eval", "digits-mpl"])
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"specquant {__version__}"


def test_weights_for_a_zoo_model_and_bits_with_avg_bits_are_one_clear_error(error_line):
    assert "--weights is for your own model" in error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits",
                                                            "4", "--weights", "w.safetensors"])
    line = error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits", "4", "--avg-bits", "3"])
    assert "not both" in line


def test_limit_is_a_seeded_stratified_subset():
    y = torch.arange(10).repeat_interleave(1000)  # sorted by class, like the CIFAR-10 test file
    idx = stratified_indices(y, 100, seed=0)
    assert idx.numel() == 100 and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 100
    assert torch.bincount(y[idx], minlength=10).tolist() == [10] * 10  # every class, its share
    assert torch.equal(idx, stratified_indices(y, 100, seed=0))  # seeded
    assert not torch.equal(idx, stratified_indices(y, 100, seed=1))
    few = stratified_indices(torch.tensor([0] * 95 + [1] * 3 + [2] * 2), 5, seed=0)
    assert set(torch.tensor([0] * 95 + [1] * 3 + [2] * 2)[few].tolist()) == {0, 1, 2}  # no class left out


def test_limit_on_the_class_sorted_cifar_test_file(data_dir):
    entry = get_entry("resnet20-cifar10")
    _, y_all = entry.test(data_dir)
    assert y_all[:100].unique().numel() == 1  # the file is sorted by class: the first 100 were one class
    x, y = load_test_set(entry, data_dir, 100, seed=0)
    assert x.shape == (100, 3, 32, 32) and torch.bincount(y, minlength=10).tolist() == [10] * 10


def test_device_option(tmp_path, capsys, error_line):
    if not torch.cuda.is_available():  # refused before any work, in one line
        assert "torch sees no CUDA device" in error_line(["quantize", "digits-mlp", "--method", "gptq", "--bits",
                                                          "4", "--device", "cuda"])
    assert "device must be auto, cpu, cuda or cuda:N" in error_line(["eval", "digits-mlp", "--device", "tpu"])
    out = tmp_path / "dev"
    assert main(["quantize", "digits-mlp", "--method", "gptq", "--bits", "4", "--calib", "64", "--device", "auto",
                 "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((out / "config.json").read_text())["device"] == expected
    assert main(["eval", str(out), "--device", "auto", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(m["accuracy"], abs=0.3)


def test_analyze_your_own_model(user_model, tmp_path, capsys, error_line):
    builder = f"{user_model['module']}:build"
    assert "give --calib-data FILE" in error_line(["analyze", builder, "--weights", str(user_model["weights"])])
    out = tmp_path / "an"
    assert main(["analyze", builder, "--weights", str(user_model["weights"]), "--calib-data", str(user_model["calib"]),
                 "--calib", "64", "--out", str(out), "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == builder and r["n_calib"] == 64
    assert [row["name"] for row in r["layers"]] == ["0", "2"] and r["layers"][0]["shape"] == "32x8"
    assert (out / "index.html").is_file()
