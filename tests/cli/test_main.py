"""``main``, the parser and the entry points: help for every option, and every error one line on
stderr with exit status 2 and no traceback."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import specquant.cli
from specquant.cli import main


def test_the_package_exports_main_only_and_the_console_script_is_main():
    assert specquant.cli.__all__ == ["main"]
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    module, _, name = re.search(r'^specquant = "([^"]+)"$', scripts, re.M).group(1).partition(":")
    assert (module, name) == ("specquant.cli.main", "main")
    assert getattr(importlib.import_module(module), name) is main


@pytest.mark.parametrize("module", ["specquant", "specquant.cli"])
def test_python_dash_m_runs_the_command(run_cli, module):
    proc = run_cli("quantize", "--help", module=module)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: specquant quantize")


def test_help_of_each_command_explains_every_option(capsys):
    for cmd, options in {
        "quantize": ["--method", "--bits", "--granularity", "--calib", "--seed", "--out", "--json", "--redundancy",
                     "--avg-bits", "--policy", "--per-channel-bits", "--data-dir", "--quiet", "--limit",
                     "--overwrite"],
        "demo": ["--out", "--calib", "--seed", "--redundancy", "--json", "--quiet", "--overwrite"],
        "eval": ["--json", "--limit", "--data-dir", "--quiet", "--allow-entry-point"],
        "analyze": ["--json", "--calib", "--seed", "--data-dir", "--quiet", "--out", "--overwrite"],
    }.items():
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)
        assert text.count("default") >= len(options) - 1, cmd  # every option states its default


def test_error_unknown_model_id(error_line):
    line = error_line(["quantize", "no-such-model", "--method", "rtn", "--bits", "4", "--quiet"])
    assert "unknown model id 'no-such-model'" in line and "digits-mlp" in line


@pytest.mark.parametrize("bits", ["0", "9", "two"])
def test_error_bits_out_of_range(error_line, bits):
    line = error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits", bits])
    assert "--bits" in line and "1 to 8" in line


def test_error_unknown_method(error_line):
    line = error_line(["quantize", "digits-mlp", "--method", "squeezellm", "--bits", "4"])  # ("awq" exists now)
    assert "--method" in line and "squeezellm" in line and "gpfq" in line and "awq+gptq" in line


def test_error_missing_data_directory_given_with_option(error_line, tmp_path):
    missing = tmp_path / "no-data"
    line = error_line(["quantize", "resnet20-cifar10", "--method", "rtn", "--bits", "4", "--data-dir", str(missing)])
    assert str(missing) in line and "--data-dir" in line and "cifar10/" in line


def test_error_missing_data_directory_from_environment(error_line, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("SPECQUANT_DATA", str(missing))
    line = error_line(["eval", "mnist-mlp"])
    assert str(missing) in line and "SPECQUANT_DATA" in line


def test_error_unreadable_file(error_line, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    line = error_line(["eval", str(bad)])
    assert str(bad) in line
    line = error_line(["eval", str(tmp_path / "missing.safetensors")])
    assert "neither a zoo id" in line
    line = error_line(["eval", str(tmp_path / "..")])  # a folder without model.safetensors
    assert "model.safetensors" in line


def test_error_argument_combinations(error_line):
    assert "--bits" in error_line(["quantize", "digits-mlp", "--method", "rtn"])
    assert "--policy" in error_line(["quantize", "digits-mlp", "--method", "rtn", "--avg-bits", "2.5"])
    assert "frame only" in error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits", "2",
                                       "--redundancy", "2"])
    assert "granularity" in error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits", "2",
                                        "--granularity", "group:x"])
    assert "COMMAND" in error_line([])


def test_error_in_a_fresh_process_has_no_traceback(run_cli):
    proc = run_cli("quantize", "digits-mlp", "--method", "rtn", "--bits", "12")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("specquant: error: ")
