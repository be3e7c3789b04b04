"""Fixtures of the CLI tests: the real command in a fresh process, one-line errors, quick
quantize runs, and finished run folders shared by the tests that only read them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specquant.cli import main

CONTRACT_KEYS = frozenset({"model", "method", "bits", "bits_per_weight", "accuracy", "float_accuracy",
                           "quant_seconds", "peak_rss_mb", "seed", "layers"})
QUICK = ("quantize", "digits-mlp", "--method", "rtn", "--calib", "64", "--limit", "50", "--quiet")


def _run(*args: str, env: dict | None = None, module: str = "specquant.cli") -> subprocess.CompletedProcess:
    """The real command in a fresh process (``python -m specquant.cli``), one thread."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("SPECQUANT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=e, timeout=300)


def _quick(out: Path, bits: int = 4, *extra: str) -> int:
    """One fast quantize run (digits-mlp, RTN, 64 calibration samples, 50 test images) into ``out``."""
    return main([*QUICK, "--bits", str(bits), "--out", str(out), *extra])


@pytest.fixture
def contract_keys() -> frozenset:
    """The keys every quantize result (and every demo run) holds (the CLI contract)."""
    return CONTRACT_KEYS


@pytest.fixture
def run_cli():
    """Function running the real command in a fresh process: ``run_cli(*args, env=None, module=...)``."""
    return _run


@pytest.fixture
def error_line(capsys):
    """Function running ``main(argv)`` that checks the error contract (exit status 2, nothing on
    stdout, exactly one ``specquant: error: ...`` line on stderr, no traceback) and returns the line."""

    def line(argv: list[str]) -> str:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith("specquant: error: ")
        assert "Traceback" not in captured.err
        return lines[0]

    return line


@pytest.fixture
def quick_argv() -> list[str]:
    """The arguments of a fast quantize run, without --bits and --out."""
    return list(QUICK)


@pytest.fixture
def quick():
    """Function ``quick(out, bits=4, *extra)``: one fast quantize run into ``out``; its exit status."""
    return _quick


@pytest.fixture
def eval_json(capsys):
    """Function ``eval_json(folder)``: the JSON result of ``specquant eval folder --json --quiet``."""

    def result(folder: Path) -> dict:
        assert main(["eval", str(folder), "--json", "--quiet"]) == 0
        return json.loads(capsys.readouterr().out)

    return result


@pytest.fixture(scope="session")
def gpfq_run(tmp_path_factory):
    """One real ``quantize digits-mlp --method gpfq --bits 3 --json --out DIR`` run, in a fresh process."""
    out = tmp_path_factory.mktemp("run") / "gpfq-w3"
    proc = _run("quantize", "digits-mlp", "--method", "gpfq", "--bits", "3", "--calib", "256", "--json",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, out


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """Two finished run folders of different runs: ``w4`` (RTN 4 bits) and ``w2`` (RTN 2 bits)."""
    base = tmp_path_factory.mktemp("two")
    assert _quick(base / "w4", 4) == 0 and _quick(base / "w2", 2) == 0
    return base / "w4", base / "w2"
