"""Adding a model: one ``ZooEntry`` registered from outside is a CLI model, saves and loads.

This is the recipe of ARCHITECTURE.md ("how to add a model"), done from a test file.
"""
import json

import pytest
import torch
from torch import nn

from specquant.cli import main
from specquant.io import load, read_header
from specquant.models import zoo


def _build():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # three classes, learnable


def _load(_data_dir=None):
    torch.manual_seed(0)
    m = _build()
    x, y = _data(512, 0)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


@pytest.fixture
def toy_entry(monkeypatch):
    entry = zoo.ZooEntry(
        id="toy-mlp", kind="classifier", description="a 4-16-3 MLP trained on the fly (test model)",
        build=_build, load=_load, calib=lambda n, seed, _d=None: _data(n, 100 + seed)[0],
        test=lambda _d=None: _data(300, 7), input_shape=(4,), needs_data_dir=False,
    )
    monkeypatch.setitem(zoo._REGISTRY, entry.id, entry)
    return entry


def test_a_registered_model_is_a_cli_model_that_saves_and_loads(toy_entry, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "toy-mlp", "--method", "gpfq", "--bits", "4", "--calib", "128", "--out", str(out),
                 "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "toy-mlp" and res["float_accuracy"] > 90
    assert res["accuracy"] >= res["float_accuracy"] - 5  # 4-bit GPFQ keeps a trained toy model
    assert read_header(out / "model.safetensors")["model"] == {"zoo_id": "toy-mlp", "arch": None}
    loaded = load(out / "model.safetensors")  # rebuilt from the zoo id: no entry point needed
    x, y = toy_entry.test()
    assert 100.0 * float((loaded(x).argmax(1) == y).float().mean()) == pytest.approx(res["accuracy"])
