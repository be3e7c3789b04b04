"""The ``specquant`` command: the JSON contract, run folders, eval of a run folder, and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specquant import cli

CONTRACT_KEYS = {"model", "method", "bits", "bits_per_weight", "accuracy", "float_accuracy", "quant_seconds",
                 "peak_rss_mb", "seed", "layers"}


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh process (``python -m specquant.cli``), one thread."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("SPECQUANT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "specquant.cli", *args], capture_output=True, text=True, env=e,
                          timeout=300)


@pytest.fixture(scope="module")
def gpfq_run(tmp_path_factory):
    """One real ``quantize digits-mlp --method gpfq --bits 3 --json --out DIR`` run."""
    out = tmp_path_factory.mktemp("run") / "gpfq-w3"
    proc = _run("quantize", "digits-mlp", "--method", "gpfq", "--bits", "3", "--calib", "256", "--json",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_quantize_json_is_one_object_with_the_contract_keys(gpfq_run):
    proc, _ = gpfq_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON object, nothing else on stdout
    metrics = json.loads(lines[0])
    assert isinstance(metrics, dict)
    assert CONTRACT_KEYS <= set(metrics)
    assert metrics["model"] == "digits-mlp" and metrics["method"] == "gpfq" and metrics["bits"] == 3
    assert metrics["seed"] == 0 and metrics["n_calib"] == 256
    assert 80.0 <= metrics["accuracy"] <= 100.0 and 90.0 <= metrics["float_accuracy"] <= 100.0
    assert [r["name"] for r in metrics["layers"]] == ["fc1", "fc2", "fc3"]
    for r in metrics["layers"]:
        assert r["bits"] == 3 and r["levels"] == 7 and r["kappa"] >= 1.0 and 0 < r["rel_output_error"] < 1
    # True storage: read from the saved file, so above the 3 code bits (scales and headers included).
    assert metrics["bits_per_weight"] > metrics["bits_per_weight_payload"] > 3.0
    assert metrics["storage"]["file_bytes"] == (gpfq_run[1] / "model.safetensors").stat().st_size
    assert metrics["quant_seconds"] > 0 and metrics["peak_rss_mb"] > 0
    # The human table went to stderr.
    assert "fc1" in proc.stderr and "bits/weight" in proc.stderr


def test_run_folder_holds_every_file(gpfq_run):
    proc, out = gpfq_run
    for name in ("config.json", "metrics.json", "layers.csv", "model.safetensors", "layers.png", "index.html"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["method"] == "gpfq" and config["bits"] == 3 and config["calib"] == 256
    assert config["quant_config"]["bits"] == 3 and config["command_line"].startswith("specquant quantize digits-mlp")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(proc.stdout)  # the file holds what --json printed
    header = (out / "layers.csv").read_text().splitlines()[0].split(",")
    assert {"name", "shape", "bits", "rel_output_error", "kappa"} <= set(header)
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_the_run_folder_reproduces_the_accuracy(gpfq_run):
    _, out = gpfq_run
    metrics = json.loads((out / "metrics.json").read_text())
    proc = _run("eval", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["accuracy"] == metrics["accuracy"]
    assert res["matches_recorded"] is True and res["quantized"] is True
    assert res["bits_per_weight"] == pytest.approx(metrics["bits_per_weight"])
    # The file itself evaluates the same.
    proc = _run("eval", str(out / "model.safetensors"), "--json", "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout)["accuracy"] == metrics["accuracy"]


def test_eval_of_a_zoo_id_gives_the_float_accuracy(gpfq_run, capsys):
    metrics = json.loads((gpfq_run[1] / "metrics.json").read_text())
    assert cli.main(["eval", "digits-mlp", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "zoo" and res["quantized"] is False
    assert res["accuracy"] == res["float_accuracy"] == metrics["float_accuracy"]


def test_frame_run_reports_redundancy_and_plots_the_sweep(tmp_path, capsys):
    out = tmp_path / "frame"
    assert cli.main(["quantize", "digits-mlp", "--method", "frame", "--bits", "2", "--redundancy", "2",
                     "--calib", "64", "--out", str(out), "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: nothing on stderr
    m = json.loads(captured.out)
    assert m["redundancy"] == 2.0 and m["bits"] == 2
    assert m["bits_per_weight_payload"] > 4.0  # 2-bit codes at redundancy 2 store > 4 bits per weight
    sweep = m["frame_redundancy"]
    assert sweep["redundancy"][0] == 1.0 and sweep["overall"][-1] < sweep["overall"][0]
    assert (out / "frame_redundancy.png").is_file()


def test_demo_quantizes_every_method_at_2_3_4_bits(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--calib", "128", "--json"]) == 0
    captured = capsys.readouterr()
    m = json.loads(captured.out)
    runs = {(r["method"], r["bits"]): r for r in m["runs"]}
    assert set(runs) == {(meth, b) for meth in cli.METHODS for b in (2, 3, 4)}
    for r in runs.values():
        assert CONTRACT_KEYS <= set(r)
        assert (out / r["file"]).is_file()
        assert r["bits_per_weight"] > r["bits"]
    assert runs[("frame", 2)]["redundancy"] == cli.DEMO_REDUNDANCY
    # The 4-bit data-driven methods stay within 3 points of the float model.
    for meth in ("rtn", "gpfq", "gptq"):
        assert runs[(meth, 4)]["accuracy"] >= m["float_accuracy"] - 3.0
    for name in ("accuracy_vs_bits.png", "layers.png", "frame_redundancy.png", "index.html", "metrics.json",
                 "config.json", "layers.csv"):
        assert (out / name).is_file(), name
    # The table on stderr lists every method.
    for meth in cli.METHODS:
        assert f"\n{meth} " in captured.err


def test_help_of_each_command_explains_every_option(capsys):
    for cmd, options in {
        "quantize": ["--method", "--bits", "--granularity", "--calib", "--seed", "--out", "--json", "--redundancy",
                     "--avg-bits", "--policy", "--per-channel-bits", "--data-dir", "--quiet", "--limit"],
        "demo": ["--out", "--calib", "--seed", "--redundancy", "--json", "--quiet"],
        "eval": ["--json", "--limit", "--data-dir", "--quiet"],
        "analyze": ["--json", "--calib", "--seed", "--data-dir", "--quiet"],
    }.items():
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)
        assert text.count("default") >= len(options) - 1, cmd  # every option states its default


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------


def _error_line(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("specquant: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_error_unknown_model_id(capsys):
    line = _error_line(capsys, ["quantize", "no-such-model", "--method", "rtn", "--bits", "4", "--quiet"])
    assert "unknown model id 'no-such-model'" in line and "digits-mlp" in line


@pytest.mark.parametrize("bits", ["0", "9", "two"])
def test_error_bits_out_of_range(capsys, bits):
    line = _error_line(capsys, ["quantize", "digits-mlp", "--method", "rtn", "--bits", bits])
    assert "--bits" in line and "1 to 8" in line


def test_error_unknown_method(capsys):
    line = _error_line(capsys, ["quantize", "digits-mlp", "--method", "awq", "--bits", "4"])
    assert "--method" in line and "awq" in line and "gpfq" in line


def test_error_missing_data_directory_given_with_option(capsys, tmp_path):
    missing = tmp_path / "no-data"
    line = _error_line(capsys, ["quantize", "resnet20-cifar10", "--method", "rtn", "--bits", "4",
                                "--data-dir", str(missing)])
    assert str(missing) in line and "--data-dir" in line and "cifar10/" in line


def test_error_missing_data_directory_from_environment(capsys, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("SPECQUANT_DATA", str(missing))
    line = _error_line(capsys, ["eval", "mnist-mlp"])
    assert str(missing) in line and "SPECQUANT_DATA" in line


def test_error_unreadable_file(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    line = _error_line(capsys, ["eval", str(bad)])
    assert str(bad) in line
    line = _error_line(capsys, ["eval", str(tmp_path / "missing.safetensors")])
    assert "neither a zoo id" in line
    line = _error_line(capsys, ["eval", str(tmp_path / "..")])  # a folder without model.safetensors
    assert "model.safetensors" in line


def test_error_argument_combinations(capsys):
    assert "--bits" in _error_line(capsys, ["quantize", "digits-mlp", "--method", "rtn"])
    assert "--policy" in _error_line(capsys, ["quantize", "digits-mlp", "--method", "rtn", "--avg-bits", "2.5"])
    assert "frame only" in _error_line(capsys, ["quantize", "digits-mlp", "--method", "rtn", "--bits", "2",
                                               "--redundancy", "2"])
    assert "granularity" in _error_line(capsys, ["quantize", "digits-mlp", "--method", "rtn", "--bits", "2",
                                                "--granularity", "group:x"])
    assert "COMMAND" in _error_line(capsys, [])


def test_error_in_a_fresh_process_has_no_traceback():
    proc = _run("quantize", "digits-mlp", "--method", "rtn", "--bits", "12")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("specquant: error: ")


def test_analyze_runs_or_says_it_is_not_available(capsys, tmp_path):
    try:
        import specquant.analyze  # noqa: F401
    except ImportError:
        line = _error_line(capsys, ["analyze", "digits-mlp"])
        assert "not available yet" in line
        return
    out = tmp_path / "an"
    assert cli.main(["analyze", "digits-mlp", "--json", "--quiet", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "digits-mlp" and [r["name"] for r in res["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(r["kappa"] >= 1.0 for r in res["layers"])
    for name in ("metrics.json", "layers.csv", "layers.png", "index.html", "config.json"):
        assert (out / name).is_file(), name


def test_mixed_precision_under_an_average_budget(capsys):
    argv = ["quantize", "digits-mlp", "--method", "rtn", "--avg-bits", "2.5", "--policy", "spectral", "--calib", "64",
            "--json", "--quiet"]
    try:
        from specquant.mixed import allocate  # noqa: F401
    except ImportError:
        assert "not available yet" in _error_line(capsys, argv)
        return
    assert cli.main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["bits"] is None and m["target_avg_bits"] == 2.5 and m["policy"] == "spectral"
    assert m["avg_bits"] <= 2.5 + 1e-9  # the budget holds (code bits, weighted by layer size)
    assert {r["name"]: r["bits"] for r in m["layers"]} == m["allocation"]["overrides"]


def test_mixed_precision_per_channel_widths_save_and_evaluate(tmp_path, capsys):
    out = tmp_path / "mixed"
    argv = ["quantize", "digits-mlp", "--method", "gpfq", "--avg-bits", "2.5", "--policy", "sensitivity",
            "--per-channel-bits", "--calib", "64", "--out", str(out), "--json", "--quiet"]
    assert cli.main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    alloc = m["allocation"]
    assert alloc["granularity"] == "channel" and m["avg_bits"] <= 2.5 + 1e-9
    assert m["avg_bits"] == pytest.approx(alloc["avg_bits"])
    assert cli.main(["eval", str(out), "--json", "--quiet"]) == 0  # the saved file holds the mixed rows
    assert json.loads(capsys.readouterr().out)["accuracy"] == m["accuracy"]
    line = _error_line(capsys, ["quantize", "digits-mlp", "--method", "gpfq", "--avg-bits", "2.5", "--policy",
                                "spectral", "--per-channel-bits"])
    assert "--per-channel-bits needs --avg-bits A --policy sensitivity" in line


@pytest.mark.slow
def test_resnet20_quantize_and_eval_on_a_subset(data_dir, tmp_path, capsys):
    """The real model, small settings: 64 calibration images, the first 200 test images."""
    out = tmp_path / "r20"
    assert cli.main(["quantize", "resnet20-cifar10", "--method", "gptq", "--bits", "4", "--calib", "64",
                     "--limit", "200", "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n_test"] == 200 and len(m["layers"]) == 20 and m["folded_bn"]
    assert m["accuracy"] >= m["float_accuracy"] - 5.0
    assert cli.main(["eval", str(out), "--json", "--quiet"]) == 0  # uses the run's --limit
    res = json.loads(capsys.readouterr().out)
    assert res["n_test"] == 200 and res["accuracy"] == m["accuracy"]
    assert Path(out / "index.html").is_file()
