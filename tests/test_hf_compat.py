"""GPT-2's ``Conv1D`` projections: turned into the ``nn.Linear`` they compute, then quantized,
saved and loaded like any Linear layer (a tiny random GPT-2 from transformers, no hub)."""
import pytest
import torch
import transformers
from torch import nn

import specquant as sq
from specquant.hf_compat import is_hf_conv1d, linearize_conv1d


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_linearize_keeps_the_function_and_the_parameter_names():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    before, keys = _logits(model, ids), set(model.state_dict())
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if is_hf_conv1d(m)}
    names = linearize_conv1d(model)
    assert sorted(names) == sorted(shapes) and len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    for n in names:
        mod = model.get_submodule(n)
        assert type(mod) is nn.Linear and tuple(mod.weight.shape) == shapes[n][::-1]
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)
    assert linearize_conv1d(model) == []  # nothing left to do


def test_a_shared_conv1d_weight_is_refused():
    model = _gpt2()
    model.transformer.h[1].mlp.c_fc.weight = model.transformer.h[0].mlp.c_fc.weight
    with pytest.raises(ValueError, match="shared with") as e:
        linearize_conv1d(model)
    assert len(str(e.value).splitlines()) == 1


def test_quantize_save_load_a_gpt2(tmp_path):
    torch.set_num_threads(1)
    model, ids = _gpt2(), torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    float_logits = _logits(model, ids)
    report = sq.quantize(model, sq.GPTQConfig(bits=4), calib=ids, progress=False)
    assert len(report.linearized) == 8 and report.to_dict()["linearized"] == report.linearized
    quantized = {r.name for r in report.layers}
    assert set(report.linearized) <= quantized  # every projection quantized, lm_head (tied to wte) float
    assert all(r.rel_output_error is not None and r.rel_output_error < 0.5 for r in report.layers)
    q_logits = _logits(model, ids)
    assert not torch.equal(q_logits, float_logits)
    path = sq.save(model, tmp_path / "gpt2.safetensors", arch=_gpt2)
    loaded = sq.load(path, build=_gpt2)
    torch.testing.assert_close(_logits(loaded, ids), q_logits, rtol=0, atol=1e-4)


def test_saving_an_unquantized_conv1d_model_is_one_line(tmp_path):
    model = _gpt2()
    with pytest.raises(ValueError, match="Conv1D that was never quantized") as e:
        sq.save(model, tmp_path / "x.safetensors", arch=_gpt2)
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()
