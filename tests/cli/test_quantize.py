"""``specquant quantize``: the JSON contract, the run folder, frame runs and mixed precision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from specquant.cli import main


def test_quantize_json_is_one_object_with_the_contract_keys(gpfq_run, contract_keys):
    proc, _ = gpfq_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON object, nothing else on stdout
    metrics = json.loads(lines[0])
    assert isinstance(metrics, dict)
    assert contract_keys <= set(metrics)
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


def test_frame_run_reports_redundancy_and_plots_the_sweep(tmp_path, capsys):
    out = tmp_path / "frame"
    assert main(["quantize", "digits-mlp", "--method", "frame", "--bits", "2", "--redundancy", "2",
                 "--calib", "64", "--out", str(out), "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: nothing on stderr
    m = json.loads(captured.out)
    assert m["redundancy"] == 2.0 and m["bits"] == 2
    assert m["bits_per_weight_payload"] > 4.0  # 2-bit codes at redundancy 2 store > 4 bits per weight
    sweep = m["frame_redundancy"]
    assert sweep["redundancy"][0] == 1.0 and sweep["overall"][-1] < sweep["overall"][0]
    assert (out / "frame_redundancy.png").is_file()


def test_awq_composes_with_any_method_by_name(capsys, error_line):
    """``--method awq+gptq``: GPTQ after the AWQ pre-step; digits-mlp has no module that can take the
    scales (ReLU between its layers), so every group is reported as skipped, with the reason."""
    assert main(["quantize", "digits-mlp", "--method", "awq+gptq", "--bits", "4", "--calib", "64", "--json",
                 "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["method"] == "awq+gptq" and [r["name"] for r in m["layers"]] == ["fc1", "fc2", "fc3"]
    assert [r["layers"] for r in m["awq"]] == [["fc1"], ["fc2"], ["fc3"]]
    assert all(r["reason"] and not r["folded"] for r in m["awq"])
    assert "invalid choice: 'awq+nope'" in error_line(["quantize", "digits-mlp", "--method", "awq+nope",
                                                       "--bits", "4"])


def test_mixed_precision_under_an_average_budget(capsys):
    argv = ["quantize", "digits-mlp", "--method", "rtn", "--avg-bits", "2.5", "--policy", "spectral", "--calib", "64",
            "--json", "--quiet"]
    assert main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["bits"] is None and m["target_avg_bits"] == 2.5 and m["policy"] == "spectral"
    assert m["avg_bits"] <= 2.5 + 1e-9  # the budget holds (code bits, weighted by layer size)
    assert {r["name"]: r["bits"] for r in m["layers"]} == m["allocation"]["overrides"]
    assert m["allocation"]["policy"] == "spectral" and m["allocation"]["granularity"] == "layer"


def test_mixed_precision_per_channel_widths_save_and_evaluate(tmp_path, capsys, error_line):
    out = tmp_path / "mixed"
    argv = ["quantize", "digits-mlp", "--method", "gpfq", "--avg-bits", "2.5", "--policy", "sensitivity",
            "--per-channel-bits", "--calib", "64", "--out", str(out), "--json", "--quiet"]
    assert main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    alloc = m["allocation"]
    assert alloc["granularity"] == "channel" and m["avg_bits"] <= 2.5 + 1e-9
    assert m["avg_bits"] == pytest.approx(alloc["avg_bits"])
    assert main(["eval", str(out), "--json", "--quiet"]) == 0  # the saved file holds the mixed rows
    assert json.loads(capsys.readouterr().out)["accuracy"] == m["accuracy"]
    line = error_line(["quantize", "digits-mlp", "--method", "gpfq", "--avg-bits", "2.5", "--policy",
                       "spectral", "--per-channel-bits"])
    assert "--per-channel-bits needs --avg-bits A --policy sensitivity" in line


@pytest.mark.slow
def test_resnet20_quantize_and_eval_on_a_subset(data_dir, tmp_path, capsys):
    """The real model, small settings: 64 calibration images, the first 200 test images."""
    out = tmp_path / "r20"
    assert main(["quantize", "resnet20-cifar10", "--method", "gptq", "--bits", "4", "--calib", "64",
                 "--limit", "200", "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n_test"] == 200 and len(m["layers"]) == 20 and m["folded_bn"]
    assert m["accuracy"] >= m["float_accuracy"] - 5.0
    assert main(["eval", str(out), "--json", "--quiet"]) == 0  # uses the run's --limit
    res = json.loads(capsys.readouterr().out)
    assert res["n_test"] == 200 and res["accuracy"] == m["accuracy"]
    assert Path(out / "index.html").is_file()


def test_activation_quantization_is_recorded_and_the_saved_file_evaluates_the_same(tmp_path, capsys, error_line,
                                                                                  gpfq_run):
    out = tmp_path / "w8a4"
    assert main(["quantize", "digits-mlp", "--method", "gpfq", "--bits", "8", "--act-bits", "4", "--act-calibrator",
                 "kl", "--calib", "64", "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["act_bits"] == 4 and m["act_calibrator"] == "kl"
    for r in m["layers"]:
        assert r["act"]["bits"] == 4 and r["act"]["calibrator"] == "kl" and r["act"]["scale"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["act_bits"] == 4 and config["quant_config"]["act_bits"] == 4
    assert config["quant_config"]["act_calibrator"] == "kl"
    assert main(["eval", str(out), "--json", "--quiet"]) == 0  # the file holds the input quantizers
    assert json.loads(capsys.readouterr().out)["accuracy"] == m["accuracy"]
    # a run without activation quantization writes no act field anywhere
    plain = json.loads((gpfq_run[1] / "metrics.json").read_text())
    assert "act_bits" not in plain and all("act" not in r for r in plain["layers"])
    assert "act_bits" not in json.loads((gpfq_run[1] / "config.json").read_text())["quant_config"]
    assert "--act-calibrator needs --act-bits A" in error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits",
                                                                "4", "--act-calibrator", "kl"])
    assert "invalid choice: 'l2'" in error_line(["quantize", "digits-mlp", "--method", "rtn", "--bits", "4",
                                                 "--act-bits", "4", "--act-calibrator", "l2"])


def test_fp8_grids_are_recorded_evaluate_the_same_and_bad_combinations_are_refused(tmp_path, capsys, error_line):
    out = tmp_path / "fp8"
    assert main(["quantize", "digits-mlp", "--method", "gptq", "--grid", "fp8-e4m3", "--act-grid", "fp8-e5m2",
                 "--calib", "64", "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["bits"] == 8 and m["grid"] == "fp8-e4m3" and m["act_bits"] == 8 and m["act_grid"] == "fp8-e5m2"
    assert all(r["levels"] == 253 and r["act"]["grid"] == "fp8-e5m2" for r in m["layers"])
    assert m["bits_per_weight_split"]["code"] == 8.0
    config = json.loads((out / "config.json").read_text())
    assert config["quant_config"]["grid"] == "fp8-e4m3" and config["quant_config"]["act_grid"] == "fp8-e5m2"
    assert main(["eval", str(out), "--json", "--quiet"]) == 0  # the file holds FP8 codes and FP8 input quantizers
    assert json.loads(capsys.readouterr().out)["accuracy"] == m["accuracy"]
    q = ["quantize", "digits-mlp", "--method", "rtn"]
    assert "--grid fp8-e4m3 stores 8-bit codes; --bits 3 contradicts it" in error_line(
        q + ["--grid", "fp8-e4m3", "--bits", "3"])
    assert "--gguf q8_0 holds integer codes; --grid fp8-e5m2 contradicts it" in error_line(
        q + ["--grid", "fp8-e5m2", "--gguf", "q8_0"])
    assert "--act-grid fp8-e4m3 is 8-bit; --act-bits 4 contradicts it" in error_line(
        q + ["--bits", "8", "--act-grid", "fp8-e4m3", "--act-bits", "4"])
    assert "invalid choice: 'fp8'" in error_line(q + ["--bits", "8", "--grid", "fp8"])
    run = tmp_path / "w"
    assert main(q + ["--grid", "fp8-e4m3", "--calib", "32", "--out", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its codes are fp8-e4m3 floats; onnxruntime's MatMulNBits holds integer codes only" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_smoothquant_and_per_token_flags_are_recorded(tmp_path, capsys, error_line):
    out = tmp_path / "sq"
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--bits", "8", "--act-bits", "8", "--act-granularity",
                 "token", "--smoothquant", "0.5", "--calib", "64", "--out", str(out), "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["act_bits"] == 8 and m["act_granularity"] == "token" and m["smoothquant"] == 0.5
    assert all(r["act"] == {"bits": 8, "granularity": "token"} for r in m["layers"])
    # an MLP's hidden inputs come out of a ReLU: no module can take the scales, each group says so
    assert m["smoothquant_groups"] and all(not g["folded"] and g["reason"] for g in m["smoothquant_groups"])
    q = json.loads((out / "config.json").read_text())["quant_config"]
    assert q["smoothquant"] == 0.5 and q["act_granularity"] == "token"
    assert main(["eval", str(out), "--json", "--quiet"]) == 0  # the file holds the per-token quantizers
    assert json.loads(capsys.readouterr().out)["accuracy"] == m["accuracy"]
    base = ["quantize", "digits-mlp", "--method", "rtn", "--bits", "8"]
    for bad in ("1.5", "-0.1", "half"):
        assert f"SmoothQuant alpha must be a number in [0, 1], got '{bad}'" in error_line(base + ["--smoothquant", bad])
    assert "--act-granularity needs --act-bits A" in error_line(base + ["--act-granularity", "token"])
    assert "invalid choice: 'row'" in error_line(base + ["--act-bits", "8", "--act-granularity", "row"])
