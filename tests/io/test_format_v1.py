"""Format version 1 stays readable, and saving is byte-stable across refactors.

``tests/io/v1/*.sq`` were written by specquant 0.1.0 (commit 1591e17, before the layout/registry
redesign) by running this file as a script: ``python tests/io/test_format_v1.py``.  Each is a
``digits-mlp`` architecture with seeded random weights, quantized with seeded random
calibration data, one file per storage layout (bit-packed, ternary five per byte, per-row
widths, frame coefficients, asymmetric with fp16 scales, groups).  The tests quantize the same
model again with today's code and check that the saved bytes are identical, and that the old
file loads to the same outputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "v1"


def _cases() -> dict:
    from specquant.algorithms import GPFQConfig, GPTQConfig, ModuleSettings, RTNConfig, SPFQConfig
    from specquant.algorithms.frame import FrameConfig

    widths = tuple([2, 3, 4, 4] * 16)  # fc2 has 64 output rows
    return {  # name: (config, save options)
        "rtn4": (RTNConfig(bits=4), {}),
        "gpfq2-trits": (GPFQConfig(bits=2), {}),
        "gptq3-asym-fp16": (GPTQConfig(bits=3, symmetric=False, search=()), {"scale_dtype": "fp16"}),
        "gpfq-rows": (GPFQConfig(bits=4, modules={"fc2": ModuleSettings(row_bits=widths)}), {}),
        # scale_rule "mse": what "output-mse" meant on groups when the file was written (it fell back to weight
        # MSE there; since 16886ff it searches each group against its inputs' block of H)
        "spfq3-group16": (SPFQConfig(bits=3, granularity="group:16", seed=3, scale_rule="mse"), {}),
        "frame2": (FrameConfig(bits=2), {}),
    }


def _quantized(name: str):
    """The ``digits-mlp`` architecture, seeded random weights, quantized as case ``name``."""
    from specquant.engine.apply import quantize
    from specquant.models import zoo

    cfg, _ = _cases()[name]
    torch.manual_seed(0)
    model = zoo.get_entry("digits-mlp").build().eval()
    calib = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    quantize(model, cfg, calib=calib, progress=False)
    return model, calib[:8]


def _save(model, name: str, path: Path) -> Path:
    from specquant.io import save

    _, opts = _cases()[name]
    return save(model, path, model_id="digits-mlp", meta={"case": name}, **opts)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures were written with one thread
    yield
    torch.set_num_threads(n)


# Cases whose config now has to name its step rule to give the same numbers: the file records the rule's
# name in each layer's info, so those bytes differ there (and in the payload hash) and nowhere else.
RULE_NAMED = {"spfq3-group16": ("output-mse", "mse")}  # name: (rule recorded in the v1 file, rule named now)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_saved_bytes_are_unchanged(tmp_path, name):
    model, _ = _quantized(name)
    path = _save(model, name, tmp_path / f"{name}.sq")
    if name not in RULE_NAMED:
        assert path.read_bytes() == (FIXTURES / f"{name}.sq").read_bytes()
        return
    from specquant.io import load, read_header

    old_rule, new_rule = RULE_NAMED[name]
    fresh_h, old_h = read_header(path), read_header(FIXTURES / f"{name}.sq")
    assert all(layer["info"]["scale_rule"] == new_rule for layer in fresh_h["layers"])
    for layer in fresh_h["layers"]:  # (the layers may share one info dict: replace, don't edit)
        layer["info"] = {**layer["info"], "scale_rule": old_rule}
    fresh_h.pop("payload_sha256"), old_h.pop("payload_sha256")
    assert fresh_h == old_h  # the header is the v1 file's but for the rule's name
    fresh, old = load(path, kernel="torch"), load(FIXTURES / f"{name}.sq", kernel="torch")
    for n, mod in old.named_modules():
        if hasattr(mod, "to_quantized_weight"):
            a, b = mod.to_quantized_weight(), fresh.get_submodule(n).to_quantized_weight()
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
            assert torch.equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_version_1_files_load_to_the_same_model(tmp_path, name):
    from specquant.io import load, read_header

    model, x = _quantized(name)
    path = FIXTURES / f"{name}.sq"
    assert read_header(path)["version"] == 1
    loaded = load(path, kernel="torch")
    fresh = load(_save(model, name, tmp_path / "fresh.sq"), kernel="torch")  # fp16 scales: the file's rounding
    with torch.no_grad():
        assert torch.equal(loaded(x), fresh(x))
        if name != "gptq3-asym-fp16":
            assert torch.equal(loaded(x), model(x))


if __name__ == "__main__":
    torch.set_num_threads(1)
    FIXTURES.mkdir(exist_ok=True)
    for case in _cases():
        m, _ = _quantized(case)
        p = _save(m, case, FIXTURES / f"{case}.sq")
        print(p, p.stat().st_size, file=sys.stderr)
