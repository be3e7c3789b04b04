"""The ``specquant`` command: the JSON contract, run folders, eval of a run folder, and errors."""
from __future__ import annotations

import json
import os
import shutil
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
                     "--avg-bits", "--policy", "--per-channel-bits", "--data-dir", "--quiet", "--limit",
                     "--overwrite"],
        "demo": ["--out", "--calib", "--seed", "--redundancy", "--json", "--quiet", "--overwrite"],
        "eval": ["--json", "--limit", "--data-dir", "--quiet", "--allow-entry-point"],
        "analyze": ["--json", "--calib", "--seed", "--data-dir", "--quiet", "--out", "--overwrite"],
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


# ---------------------------------------------------------------------------------------------
# Run folders appear whole or not at all; eval checks that a folder's files belong together
# ---------------------------------------------------------------------------------------------

QUICK = ["quantize", "digits-mlp", "--method", "rtn", "--calib", "64", "--limit", "50", "--quiet"]


def _quick(out: Path, bits: int = 4, *extra: str) -> int:
    """One fast quantize run (digits-mlp, RTN, 64 calibration samples, 50 test images) into ``out``."""
    return cli.main([*QUICK, "--bits", str(bits), "--out", str(out), *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Hidden staging (``.NAME.partial-*``) or set-aside (``.NAME.old-*``) folders in ``parent``."""
    return sorted(n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n)


def _eval_json(capsys, folder: Path) -> dict:
    assert cli.main(["eval", str(folder), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished run folders of different runs: ``w4`` (RTN 4 bits) and ``w2`` (RTN 2 bits)."""
    base = tmp_path_factory.mktemp("two")
    assert _quick(base / "w4", 4) == 0 and _quick(base / "w2", 2) == 0
    return base / "w4", base / "w2"


@pytest.mark.parametrize("command", [
    ["quantize", "digits-mlp", "--method", "rtn", "--bits", "4", "--calib", "64"],
    ["demo", "--calib", "64"],
    ["analyze", "digits-mlp"],
])
def test_non_empty_out_is_refused_without_overwrite_and_left_unchanged(capsys, tmp_path, command):
    if command[0] == "analyze":
        pytest.importorskip("specquant.analyze")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "model.safetensors").write_bytes(b"not yours")
    before = _snapshot(out)
    line = _error_line(capsys, [*command, "--out", str(out), "--quiet"])
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["notes.txt", "sub"]
    assert _leftovers(tmp_path) == []


def test_a_second_run_into_a_finished_run_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "r"
    assert _quick(out, 4) == 0
    before = _snapshot(out)
    line = _error_line(capsys, [*QUICK, "--bits", "2", "--out", str(out)])
    assert "not empty" in line
    assert _snapshot(out) == before  # the first run's files, untouched: nothing of the second mixed in
    assert json.loads((out / "config.json").read_text())["bits"] == 4


def test_an_existing_empty_folder_is_a_fine_target(capsys, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert _quick(out) == 0
    assert {"config.json", "metrics.json", "layers.csv", "model.safetensors", "layers.png",
            "index.html"} <= set(os.listdir(out))
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_the_old_folder_whole(capsys, tmp_path):
    out = tmp_path / "r"
    assert _quick(out, 4) == 0
    old_id = json.loads((out / "metrics.json").read_text())["run_id"]
    (out / "stale.txt").write_text("from before")
    assert _quick(out, 2, "--overwrite") == 0
    names = set(os.listdir(out))
    assert "stale.txt" not in names  # replaced whole, not merged
    assert {"config.json", "metrics.json", "layers.csv", "model.safetensors", "layers.png", "index.html"} <= names
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["bits"] == metrics["bits"] == 2 and config["run_id"] == metrics["run_id"] != old_id
    assert _leftovers(tmp_path) == []
    assert _eval_json(capsys, out)["verified"] is True
    assert "--overwrite needs --out" in _error_line(capsys, [*QUICK, "--bits", "4", "--overwrite"])


def _fail_after_the_model_is_saved(monkeypatch, exc: BaseException) -> list[tuple[Path, bool]]:
    """Make index.html, the last file a run writes, raise ``exc``; returns (the folder it was
    written in, whether model.safetensors and metrics.json were already there) per call."""
    import specquant.report.html as html

    seen: list[tuple[Path, bool]] = []

    def boom(path, *a, **k):
        folder = Path(path).parent
        seen.append((folder, (folder / "model.safetensors").is_file() and (folder / "metrics.json").is_file()))
        raise exc

    monkeypatch.setattr(html, "write_html", boom)
    return seen


@pytest.mark.parametrize("exc, status", [(RuntimeError("disk on fire"), 2), (KeyboardInterrupt(), 130)])
def test_a_run_that_fails_midway_leaves_no_folder_at_all(capsys, tmp_path, monkeypatch, exc, status):
    seen = _fail_after_the_model_is_saved(monkeypatch, exc)
    out = tmp_path / "r"
    assert _quick(out) == status
    [(folder, written)] = seen
    assert written  # the run failed after the model and the metrics were written ...
    assert folder.parent == tmp_path and folder.name.startswith(".r.partial-")  # ... beside the target
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no target, no hidden .partial folder either
    assert capsys.readouterr().out == ""


def test_a_failed_overwrite_leaves_the_old_folder_intact(capsys, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert _quick(out, 4) == 0
    before = _snapshot(out)
    _fail_after_the_model_is_saved(monkeypatch, KeyboardInterrupt())
    assert _quick(out, 2, "--overwrite") == 130
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_a_failed_demo_leaves_nothing_under_runs(capsys, tmp_path, monkeypatch):
    """The demo's default runs/demo-<timestamp> is built the same way: a failure leaves nothing."""
    monkeypatch.chdir(tmp_path)
    real_storage = cli._storage

    def storage_then_fail(model, model_id, path, meta):
        real_storage(model, model_id, path, meta)  # the first packed model is saved ...
        raise RuntimeError("out of disk")  # ... then the run fails

    monkeypatch.setattr(cli, "_storage", storage_then_fail)
    assert cli.main(["demo", "--calib", "64", "--quiet"]) == 2
    assert "out of disk" in capsys.readouterr().err
    assert os.listdir(tmp_path / "runs") == []


def test_two_runs_into_one_folder_cannot_mix(capsys, tmp_path, monkeypatch):
    """Run B writes the folder while run A is still working: A fails, B's folder is left whole."""
    import specquant.report.html as html

    out = tmp_path / "shared"
    real_write_html = html.write_html
    nested: list[int] = []

    def write_html_after_another_run(*a, **k):
        if not nested:  # run A, about to finish: run B starts and finishes first
            nested.append(-1)
            nested[0] = _quick(out, 2)
        return real_write_html(*a, **k)

    monkeypatch.setattr(html, "write_html", write_html_after_another_run)
    line = _error_line(capsys, [*QUICK, "--bits", "4", "--out", str(out)])
    assert nested == [0]
    assert str(out) in line and "another run" in line
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["bits"] == metrics["bits"] == 2 and config["run_id"] == metrics["run_id"]
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert _eval_json(capsys, out)["verified"] is True


def test_run_folder_records_run_id_and_model_sha256(two_runs):
    import hashlib

    for out in two_runs:
        config = json.loads((out / "config.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        assert config["model_sha256"] == metrics["model_sha256"] == digest
        assert config["run_id"] == metrics["run_id"] and len(metrics["run_id"]) == 32
    assert json.loads((two_runs[0] / "metrics.json").read_text())["run_id"] != \
        json.loads((two_runs[1] / "metrics.json").read_text())["run_id"]


def test_eval_of_a_good_run_folder_is_verified(capsys, two_runs):
    res = _eval_json(capsys, two_runs[0])
    assert res["verified"] is True and res["matches_recorded"] is True


def test_eval_detects_a_model_from_another_run(capsys, tmp_path, two_runs):
    w4, w2 = two_runs
    folder = tmp_path / "w4"
    shutil.copytree(w4, folder)
    shutil.copyfile(w2 / "model.safetensors", folder / "model.safetensors")
    line = _error_line(capsys, ["eval", str(folder)])
    assert "inconsistent" in line and str(folder) in line
    assert "model.safetensors is not the model metrics.json describes (SHA-256 differs)" in line


def test_eval_detects_metrics_from_another_run(capsys, tmp_path, two_runs):
    w4, w2 = two_runs
    folder = tmp_path / "w4"
    shutil.copytree(w4, folder)
    shutil.copyfile(w2 / "metrics.json", folder / "metrics.json")
    line = _error_line(capsys, ["eval", str(folder)])
    assert "inconsistent" in line and "metrics.json is from another run" in line


def test_eval_of_an_older_run_folder_is_not_verified(capsys, tmp_path, two_runs):
    folder = tmp_path / "old"
    shutil.copytree(two_runs[0], folder)
    for name in ("config.json", "metrics.json"):  # as an older specquant wrote them
        doc = json.loads((folder / name).read_text())
        del doc["run_id"], doc["model_sha256"]
        (folder / name).write_text(json.dumps(doc))
    res = _eval_json(capsys, folder)
    assert res["verified"] is False and res["matches_recorded"] is True


def test_eval_passes_allow_entry_point_to_the_loader(capsys, two_runs, monkeypatch):
    import specquant.io

    real_load = specquant.io.load
    calls: list[dict] = []

    def recording_load(path, *args, **kwargs):
        calls.append(kwargs)
        return real_load(path)

    monkeypatch.setattr(specquant.io, "load", recording_load)
    model = str(two_runs[0] / "model.safetensors")
    assert cli.main(["eval", model, "--quiet", "--allow-entry-point", "mypkg.models:build",
                     "--allow-entry-point", "other:make_net"]) == 0
    assert cli.main(["eval", model, "--quiet"]) == 0
    assert [c.get("allow_entry_point", "not passed") for c in calls] == [["mypkg.models:build", "other:make_net"],
                                                                         None]
    line = _error_line(capsys, ["eval", model, "--allow-entry-point", "not an entry point"])
    assert "--allow-entry-point" in line and "MODULE:FUNCTION" in line
