"""``specquant train``: QAT from a quantize run folder on digits-mlp (no data directory needed)."""
from __future__ import annotations

import json

import pytest

from specquant.cli import main
from specquant.io.files import read_json


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    """A 2-bit (ternary) RTN run folder of digits-mlp."""
    out = tmp_path_factory.mktemp("ptq") / "rtn-w2"
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--bits", "2", "--calib", "64", "--out", str(out),
                 "--quiet"]) == 0
    return out


def test_train_writes_a_run_folder_that_eval_reproduces(ptq_run, tmp_path, capsys, eval_json):
    out = tmp_path / "qat"
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "3", "--lr", "0.05", "--lsq",
                 "--optimizer", "adam", "--seed", "1", "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "epochs", "train_seconds", "ptq_accuracy", "float_accuracy", "bits_per_weight"):
        assert key in m, key
    assert m["epochs"] == 3 and m["train_seconds"] > 0 and m["method"] == "qat+rtn" and m["bits"] == 2
    assert m["ptq_accuracy"] == read_json(ptq_run / "metrics.json")["accuracy"]  # the start is the run's model
    assert m["n_train"] == 1437 and len(m["epoch_loss"]) == 3
    assert all(r["levels"] == 3 for r in m["layers"])  # still ternary
    assert any(r["codes_changed"] > 0 for r in m["layers"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "index.html", "layers.csv", "metrics.json",
                                                     "model.safetensors"]
    again = eval_json(out)
    assert again["verified"] is True and again["accuracy"] == m["accuracy"]


def test_same_seed_same_result(ptq_run, capsys):
    accs = []
    for _ in range(2):
        assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "2", "--optimizer", "adam",
                     "--lr", "0.01", "--json", "--quiet"]) == 0
        m = json.loads(capsys.readouterr().out)
        accs.append((m["accuracy"], m["epoch_loss"]))
    assert accs[0] == accs[1]


def test_kappa_reg_is_recorded(ptq_run, capsys):
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--kappa-reg", "0.01", "--json",
                 "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["kappa_reg"] == 0.01 and len(m["epoch_kappa"]) == 1 and m["epoch_kappa"][0] > 0


def test_scale_lr_factor_is_taken_and_recorded(ptq_run, capsys):
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--lsq", "--scale-lr-factor", "0.1",
                 "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["scale_lr_factor"] == 0.1 and m["lsq"] is True


def test_mixup_is_taken_and_recorded(ptq_run, capsys):
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--mixup", "0.4",
                 "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["mixup"] == 0.4


def test_ema_is_taken_and_recorded(ptq_run, capsys, error_line):
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--ema", "0.99",
                 "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["ema"] == 0.99 and m["batch_norm"] is False
    assert "expected a decay in [0, 1), got '1'" in error_line(
        ["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--ema", "1"])


def test_batch_norm_needs_a_convolution(ptq_run, error_line):
    assert "train: --batch-norm: batch_norm: the model has no quantized convolution" in error_line(
        ["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--batch-norm"])


def test_distillation_from_the_float_model_is_taken_and_recorded(ptq_run, capsys):
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "2", "--distill", "--distill-alpha", "0.7",
                 "--distill-temperature", "2", "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["distill"] == {"teacher": "digits-mlp", "alpha": 0.7, "temperature": 2.0}
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "2", "--json", "--quiet"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["distill"] is None and plain["epoch_loss"] != m["epoch_loss"]  # the teacher changed the training


def test_feature_distillation_is_taken_and_recorded(ptq_run, capsys, error_line):
    assert main(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "2", "--distill", "--feature-distill", "2",
                 "--feature-layers", "act1", "act2", "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["feature_distill"] == {"beta": 2.0, "layers": ["act1", "act2"]}
    assert len(m["epoch_feature"]) == 2 and all(v > 0 for v in m["epoch_feature"])
    run = ["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1"]
    assert "--feature-distill needs --distill" in error_line(run + ["--feature-distill", "1",
                                                                    "--feature-layers", "act1"])
    assert "the student has no module 'nope'" in error_line(run + ["--distill", "--feature-distill", "1",
                                                                   "--feature-layers", "nope"])
    assert "needs feature_layers" in error_line(run + ["--distill", "--feature-distill", "1"])
    assert "--feature-layers needs --feature-distill" in error_line(run + ["--feature-layers", "act1"])


def test_a_teacher_with_other_inputs_is_refused_in_one_line(ptq_run, data_dir, error_line):
    assert "does not take digits-mlp's inputs" in error_line(["train", "digits-mlp", "--from", str(ptq_run),
                                                              "--epochs", "1", "--distill", "--teacher", "mnist-mlp",
                                                              "--data-dir", str(data_dir)])


def test_errors_are_one_line(ptq_run, tmp_path, error_line):
    assert "is a run of 'digits-mlp', not 'mnist-mlp'" in error_line(
        ["train", "mnist-mlp", "--from", str(ptq_run), "--epochs", "1"])
    assert "is not a run folder" in error_line(["train", "digits-mlp", "--from", str(tmp_path / "nope"),
                                                "--epochs", "1"])
    assert "--epochs" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "0"])
    assert "--lr" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--lr", "-1"])
    assert "--scale-lr-factor" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1",
                                              "--scale-lr-factor", "0"])
    assert "--teacher needs --distill" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1",
                                                      "--teacher", "digits-mlp"])
    assert "--distill-alpha" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1",
                                            "--distill", "--distill-alpha", "1.5"])
    assert "is not a classifier" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1",
                                                "--distill", "--teacher", "stories260k"])
    assert "unknown model id" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1",
                                             "--distill", "--teacher", "nope"])
    assert "--mixup" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--mixup", "-1"])
    assert "--from" in error_line(["train", "digits-mlp", "--epochs", "1"])
    assert "needs images" in error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1",
                                         "--augment", "crop-flip"])
    out = tmp_path / "bad"
    error_line(["train", "digits-mlp", "--from", str(ptq_run), "--epochs", "1", "--augment", "crop-flip",
                "--out", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".bad*"))  # whole or nothing
