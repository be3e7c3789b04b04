"""``specquant export``: a run quantized with --gguf becomes a GGUF that llama.cpp runs to the same
perplexity (stories260k, small settings); a run on another grid is refused with one line."""
import json

import pytest
import torch

from specquant.cli import main
from specquant.models.llama_gguf import load_llama_gguf


def _quantize(data_dir, out, *extra):
    assert main(["quantize", "stories260k", "--method", "gptq", "--calib", "8", "--seq-len", "128",
                 "--eval-windows", "4", "--out", str(out), "--json", "--quiet", "--data-dir", str(data_dir),
                 *extra]) == 0


def test_gguf_flag_sets_the_grid_and_leaves_unblockable_layers_float(data_dir, tmp_path, capsys):
    _quantize(data_dir, tmp_path / "run", "--gguf", "q4_0", "--protect", "model.layers.0.*=8")
    res = json.loads(capsys.readouterr().out)
    assert res["gguf"] == "q4_0" and res["granularity"] == "group:32" and res["bits"] == 4
    widths = {r["name"]: r["bits"] for r in res["layers"]}
    assert not any(n.endswith("down_proj") for n in widths)  # 172 inputs: no 32-block fits, kept float
    assert {r["name"] for r in res["skipped"]} >= {f"model.layers.{i}.mlp.down_proj" for i in range(5)}
    assert widths["model.layers.0.self_attn.q_proj"] == 8 and widths["model.layers.1.self_attn.q_proj"] == 4

    gguf = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(gguf), "--json", "--quiet",
                 "--data-dir", str(data_dir)]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert {"file", "bytes", "format", "type"} <= set(exp)
    assert exp["format"] == "gguf" and exp["type"] == "mixed(Q4_0,Q8_0)" and exp["bytes"] == gguf.stat().st_size
    assert exp["tensors"]["blk.1.ffn_down.weight"] == "F32" and exp["tensors"]["blk.1.attn_q.weight"] == "Q4_0"
    # the file decodes (gguf package) to the saved model's weights: same logits
    import specquant as sq

    saved = sq.load(tmp_path / "run" / "model.safetensors")
    x = torch.randint(0, 512, (1, 32))
    assert torch.equal(load_llama_gguf(gguf)(x).logits, saved(x).logits)
    # refuses to overwrite without --overwrite
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(gguf), "--quiet",
                 "--data-dir", str(data_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_refuses_a_grid_gguf_cannot_hold(data_dir, tmp_path, capsys):
    _quantize(data_dir, tmp_path / "run", "--bits", "4", "--granularity", "group:32")  # float32 scales
    capsys.readouterr()
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--out", str(out), "--quiet",
                 "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "float32 scales" in err and "model.layers.0.self_attn.q_proj" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("args,needle", [
    (["--gguf", "q4_0", "--bits", "3"], "contradicts"),
    (["--gguf", "q4_0", "--asymmetric"], "symmetric"),
    (["--gguf", "q8_0", "--granularity", "group:64"], "groups of 32"),
    (["--gguf", "q4_1", "--protect", "model.layers.0.*=8"], "4 bits or float"),
])
def test_gguf_flag_refuses_contradictions(data_dir, tmp_path, capsys, args, needle):
    assert main(["quantize", "stories260k", "--method", "rtn", "--quiet", "--data-dir", str(data_dir), *args]) == 2
    assert needle in capsys.readouterr().err


def test_onnx_export_of_a_classifier_run(tmp_path, capsys):
    """digits-mlp (no data needed) at 4 bits, groups of 32 -> ONNX with MatMulNBits; onnxruntime's
    outputs match the saved model's."""
    import importlib.util
    import os

    if importlib.util.find_spec("onnxruntime") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set and onnxruntime is not installed (make installs the 'runtimes' extra)")
        pytest.skip("onnxruntime is not installed (make installs the 'runtimes' extra)")
    import numpy as np
    import onnxruntime as ort

    import specquant as sq

    run = tmp_path / "run"
    assert main(["quantize", "digits-mlp", "--method", "gptq", "--bits", "4", "--granularity", "group:32",
                 "--calib", "64", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "onnx" and res["bytes"] == out.stat().st_size and res["file"] == str(out)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = sq.load(run / "model.safetensors", kernel="torch")(x).detach().numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    types = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert "MatMulNBits" in types


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_export_refuses_activation_quantization(tmp_path, capsys, fmt):
    """A run with --act-bits quantizes layer inputs, which neither MatMulNBits nor GGUF blocks hold:
    one line, no file (never a model that silently differs)."""
    run = tmp_path / "run"
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--bits", "4", "--granularity", "group:32",
                 "--act-bits", "8", "--calib", "32", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / f"m.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and (("input activations" in err) or ("language models" in err))
    assert not out.exists()
