"""Run folders of every command appear whole or not at all: a non-empty --out is refused, a
failed or interrupted run leaves nothing, --overwrite swaps the old folder only at the end, and
two runs into one folder cannot mix."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import specquant.report.html as html


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Hidden staging (``.NAME.partial-*``) or set-aside (``.NAME.old-*``) folders in ``parent``."""
    return sorted(n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n)


@pytest.mark.parametrize("command", [
    ["quantize", "digits-mlp", "--method", "rtn", "--bits", "4", "--calib", "64"],
    ["demo", "--calib", "64"],
    ["analyze", "digits-mlp"],
])
def test_non_empty_out_is_refused_without_overwrite_and_left_unchanged(tmp_path, command, error_line):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(b"not yours")
    before = _snapshot(out)
    line = error_line([*command, "--out", str(out), "--quiet"])
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["notes.txt", "sub"]
    assert _leftovers(tmp_path) == []


def test_a_second_run_into_a_finished_run_folder_is_refused(tmp_path, quick, quick_argv, error_line):
    out = tmp_path / "r"
    assert quick(out, 4) == 0
    before = _snapshot(out)
    line = error_line([*quick_argv, "--bits", "2", "--out", str(out)])
    assert "not empty" in line
    assert _snapshot(out) == before  # the first run's files, untouched: nothing of the second mixed in
    assert json.loads((out / "config.json").read_text())["bits"] == 4


def test_an_existing_empty_folder_is_a_fine_target(tmp_path, quick):
    out = tmp_path / "empty"
    out.mkdir()
    assert quick(out) == 0
    assert {"config.json", "metrics.json", "layers.csv", "model.safetensors", "layers.png",
            "index.html"} <= set(os.listdir(out))
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_the_old_folder_whole(tmp_path, quick, quick_argv, eval_json, error_line):
    out = tmp_path / "r"
    assert quick(out, 4) == 0
    old_id = json.loads((out / "metrics.json").read_text())["run_id"]
    (out / "stale.txt").write_text("from before")
    assert quick(out, 2, "--overwrite") == 0
    names = set(os.listdir(out))
    assert "stale.txt" not in names  # replaced whole, not merged
    assert {"config.json", "metrics.json", "layers.csv", "model.safetensors", "layers.png", "index.html"} <= names
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["bits"] == metrics["bits"] == 2 and config["run_id"] == metrics["run_id"] != old_id
    assert _leftovers(tmp_path) == []
    assert eval_json(out)["verified"] is True
    assert "--overwrite needs --out" in error_line([*quick_argv, "--bits", "4", "--overwrite"])


def _fail_after_the_model_is_saved(monkeypatch, exc: BaseException) -> list[tuple[Path, bool]]:
    """Make index.html, the last file a run writes, raise ``exc``; returns (the folder it was
    written in, whether model.safetensors and metrics.json were already there) per call."""
    seen: list[tuple[Path, bool]] = []

    def boom(path, *a, **k):
        folder = Path(path).parent
        seen.append((folder, (folder / "model.safetensors").is_file() and (folder / "metrics.json").is_file()))
        raise exc

    monkeypatch.setattr(html, "write_html", boom)
    return seen


@pytest.mark.parametrize("exc, status", [(RuntimeError("disk on fire"), 2), (KeyboardInterrupt(), 130)])
def test_a_run_that_fails_midway_leaves_no_folder_at_all(capsys, tmp_path, monkeypatch, quick, exc, status):
    seen = _fail_after_the_model_is_saved(monkeypatch, exc)
    out = tmp_path / "r"
    assert quick(out) == status
    [(folder, written)] = seen
    assert written  # the run failed after the model and the metrics were written ...
    assert folder.parent == tmp_path and folder.name.startswith(".r.partial-")  # ... beside the target
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no target, no hidden .partial folder either
    assert capsys.readouterr().out == ""


def test_a_failed_overwrite_leaves_the_old_folder_intact(tmp_path, monkeypatch, quick):
    out = tmp_path / "r"
    assert quick(out, 4) == 0
    before = _snapshot(out)
    _fail_after_the_model_is_saved(monkeypatch, KeyboardInterrupt())
    assert quick(out, 2, "--overwrite") == 130
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_two_runs_into_one_folder_cannot_mix(tmp_path, monkeypatch, quick, quick_argv, eval_json, error_line):
    """Run B writes the folder while run A is still working: A fails, B's folder is left whole."""
    out = tmp_path / "shared"
    real_write_html = html.write_html
    nested: list[int] = []

    def write_html_after_another_run(*a, **k):
        if not nested:  # run A, about to finish: run B starts and finishes first
            nested.append(-1)
            nested[0] = quick(out, 2)
        return real_write_html(*a, **k)

    monkeypatch.setattr(html, "write_html", write_html_after_another_run)
    line = error_line([*quick_argv, "--bits", "4", "--out", str(out)])
    assert nested == [0]
    assert str(out) in line and "another run" in line
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["bits"] == metrics["bits"] == 2 and config["run_id"] == metrics["run_id"]
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert eval_json(out)["verified"] is True
