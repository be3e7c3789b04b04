"""``specquant quantize ... --nproc N``: the same JSON and run folder as one process (plus nproc and
comm_bytes), one error line for bad flags and for a rank that fails, no output then, and no wait
for the collective timeout."""
import json
import textwrap
import time
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from specquant.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_KEYS = {"quant_seconds", "eval_seconds", "float_eval_seconds", "total_seconds", "peak_rss_mb", "run_id"}


def _same(a, b, path="") -> None:
    """Equal JSON values, timings aside (they differ from run to run)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in TIMING_KEYS and k != "seconds":
                _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _one_and_two_ranks(argv, tmp_path, capsys) -> dict:
    """Run ``argv`` in one process and over 2 ranks; assert the same JSON (timings aside, plus nproc
    and comm_bytes) and the same saved file; the one-process JSON."""
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*argv, "--out", str(tmp_path / "two"), "--nproc", "2", "--dist-timeout", "120"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two.pop("nproc") == 2 and two.pop("comm_bytes") > 0
    _same(one, two)
    one_file, two_file = tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors"
    assert one_file.read_bytes() == two_file.read_bytes()
    return one


def test_two_ranks_write_the_run_folder_of_one_process(tmp_path, capsys):
    argv = ["quantize", "digits-mlp", "--method", "gptq", "--bits", "3", "--calib", "384", "--limit", "60",
            "--json", "--quiet"]
    _one_and_two_ranks(argv, tmp_path, capsys)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.parametrize("extra, match", [
    (["--nproc", "0"], "--nproc: expected a positive integer, got 0"),
    (["--nproc", "two"], "--nproc: expected a positive integer, got 'two'"),
    (["--nproc", "2", "--dist-timeout", "0"], "--dist-timeout: expected a number > 0"),
    (["--nproc", "2", "--act-bits", "8"], "--act-bits is not supported with 2 ranks"),
    (["--nproc", "2", "--smoothquant", "0.5"], "--smoothquant is not supported with 2 ranks"),
])
def test_bad_nproc_uses_are_one_line(error_line, extra, match):
    base = ["quantize", "digits-mlp", "--method", "rtn", "--calib", "64"]
    if "--avg-bits" not in extra:
        base += ["--bits", "4"]
    assert match in error_line([*base, *extra])


def test_two_ranks_share_the_sensitivity_pass_of_mixed_precision(tmp_path, capsys):
    """--avg-bits with --policy sensitivity over 2 ranks: the layers' sensitivities are measured on
    their ranks and summed, so the allocation, the JSON and the saved file are those of one process."""
    argv = ["quantize", "digits-mlp", "--method", "gptq", "--avg-bits", "2.5", "--policy", "sensitivity",
            "--calib", "384", "--limit", "60", "--json", "--quiet"]
    one = _one_and_two_ranks(argv, tmp_path, capsys)
    assert len({layer["bits"] for layer in one["allocation"]["layers"]}) > 1  # really mixed


def test_awq_and_a_contradicting_world_size_are_refused(error_line, monkeypatch):
    argv = ["quantize", "digits-mlp", "--bits", "4", "--calib", "64"]
    line = error_line([*argv, "--method", "awq+gptq", "--nproc", "2"])
    assert "--method awq+gptq is not supported with 2 ranks" in line
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert "--nproc 2 contradicts WORLD_SIZE=3" in error_line([*argv, "--method", "rtn", "--nproc", "2"])


FAULTY = """
import os
import time
import torch
from torch import nn


class Faulty(nn.Module):
    calls = 0

    def forward(self, x):
        Faulty.calls += 1
        if os.environ.get("RANK") == "1" and Faulty.calls > 3:  # rank 1, after the first layers' exchanges
            with open(os.environ["SQ_FAULT_STAMP"], "w") as f:
                f.write(repr(time.time()))
            if os.environ.get("SQ_FAULT") == "exit":
                os._exit(7)
            raise ValueError("boom in the user's layer")
        return torch.relu(x)


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), Faulty(), nn.Linear(32, 3))
"""


@pytest.mark.parametrize("fault, match", [("raise", "rank 1 failed: boom in the user's layer"),
                                          ("exit", "rank 1 of 2 exited with status 7 without an error message")])
def test_a_failing_rank_fails_the_run_at_once_without_output(tmp_path, monkeypatch, error_line, fault, match):
    """Rank 1 raises (or exits) in the middle of the walk: one line naming it, no run folder (rank 0's
    staging folder is gone too), and the launcher returns seconds after the failure, not after the
    60 s collective timeout."""
    name = f"sq_faulty_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FAULTY))
    monkeypatch.syspath_prepend(str(tmp_path))  # the launcher passes its sys.path to the ranks
    monkeypatch.setenv("SQ_FAULT", fault)
    monkeypatch.setenv("SQ_FAULT_STAMP", str(tmp_path / "stamp"))
    torch.manual_seed(0)
    weights = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 3)).state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "calib.npz", x=x[:256].numpy())
    torch.save({"x": x[256:], "y": torch.zeros(44, dtype=torch.long)}, tmp_path / "eval.pt")
    out = tmp_path / "run"
    line = error_line(["quantize", f"{name}:build", "--weights", str(tmp_path / "w.safetensors"),
                       "--calib-data", str(tmp_path / "calib.npz"), "--eval-data", str(tmp_path / "eval.pt"),
                       "--method", "gptq", "--bits", "4", "--calib", "256", "--out", str(out), "--quiet",
                       "--nproc", "2", "--dist-timeout", "60"])
    ended = time.time()
    assert match in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert ended - float((tmp_path / "stamp").read_text()) < 15.0
