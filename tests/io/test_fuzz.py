"""Fuzzing the loader: generated corruptions of real saved files give a clear error or a model
that runs, never anything else (``benchmarks/fuzz_loader.py`` runs the same with many more cases).
"""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from specquant.algorithms import GPFQConfig, GPTQConfig, ModuleSettings, RTNConfig
from specquant.algorithms.frame import FrameConfig
from specquant.engine.apply import quantize
from specquant.io import load, save
from specquant.io.corrupt import mutate, outcome

EXAMPLES = 600  # per base file: 7 files, 4,200 corruptions in all (about 2 s a file)


def _conv():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def _conv_input(n=4):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _mlp_input(n=4):
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(1))


CASES = {  # name: (builder, example input, config, save options)
    "conv-rtn3": (_conv, _conv_input, RTNConfig(bits=3), {}),
    "conv-gpfq2-trits": (_conv, _conv_input, GPFQConfig(bits=2), {}),
    "mlp-asym4-fp16": (_mlp, _mlp_input, RTNConfig(bits=4, symmetric=False), {"scale_dtype": "fp16"}),
    "mlp-rows": (_mlp, _mlp_input,
                 RTNConfig(bits=4, modules={"2": ModuleSettings(row_bits=(2, 4, 3, 4, 2) * 3 + (4,))}), {}),
    "mlp-frame": (_mlp, _mlp_input, FrameConfig(bits=2), {}),
    # groups of 5 on 12 and 16 inputs (last groups of 2 and 1), act order, float16 scales chosen as stored
    "mlp-gptq-group5-fp16": (_mlp, _mlp_input, GPTQConfig(bits=4, granularity="group:5", symmetric=False,
                                                          scale_dtype="float16"), {}),
    "mlp-float": (_mlp, _mlp_input, None, {}),
}


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, (build, example, cfg, opts) in CASES.items():
        torch.manual_seed(0)
        m = build().eval()
        if cfg is not None:
            quantize(m, cfg, calib=example(32), progress=False)
        path = save(m, folder / f"{name}.sq", arch=build, **opts)
        assert load(path, build=build) is not None
        out[name] = path.read_bytes()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_corrupted_files_give_a_clear_error_or_a_working_model(base_files, tmp_path, name):
    build, example, _, _ = CASES[name]
    data = base_files[name]
    x = example()
    path = tmp_path / "bad.sq"
    loader = functools.partial(load, build=build)
    seen = {"clear": 0, "loaded": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(d):
        label, bad = mutate(d.draw, data)
        path.write_bytes(bad)
        res = outcome(path, loader, x, label)
        assert res.kind != "other", f"{label}: {res.message}"
        seen[res.kind] += 1

    check()
    assert seen["clear"] > EXAMPLES // 2  # most corruptions must be caught, not loaded
