"""Out-of-core quantization of a Hugging Face folder (``sq.quantize_folder``, ``--max-memory``):
tiny random Llama models written with ``save_pretrained`` in sharded safetensors, quantized block
by block, compared bit for bit with the in-memory engine followed by ``sq.save``."""
import functools
import json

import pytest
import torch
import transformers

import specquant as sq
from specquant.engine import spill
from specquant.io import load, save
from specquant.outofcore import parse_memory

VOCAB = 96


def _folder(tmp_path, tied: bool, layers: int = 2):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    folder = tmp_path / ("tied" if tied else "untied")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="20KB")
    return folder


def _build(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (6, 16), generator=g)


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["specquant"])


def _in_memory(folder, cfg, calib, path, batch_size):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    report = sq.quantize(model, cfg, calib=calib, progress=False, batch_size=batch_size)
    save(model, path, arch=functools.partial(_build, folder))
    return model, report


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
@pytest.mark.parametrize("cfg", [sq.GPTQConfig(bits=4, granularity="group:16"), sq.GPFQConfig(bits=3)],
                         ids=["gptq-w4g16", "gpfq-w3"])
def test_out_of_core_equals_in_memory_bit_for_bit(tmp_path, tied, cfg):
    torch.set_num_threads(1)
    folder = _folder(tmp_path, tied)
    assert len(list(folder.glob("*.safetensors"))) >= 2 and (folder / "model.safetensors.index.json").is_file()
    calib = _calib()
    model, report = _in_memory(folder, cfg, calib, tmp_path / "mem.sq", batch_size=4)
    res = sq.quantize_folder(folder, cfg, calib, tmp_path / "ooc.sq", max_memory="4GB", batch_size=4,
                             progress=False, workdir=tmp_path)
    assert [r.name for r in res.report.layers] == [r.name for r in report.layers]
    assert len(report.layers) == 2 * 7 + (not tied)  # the untied lm_head is quantized too
    for a, b in zip(res.report.layers, report.layers):
        assert a.rel_output_error == b.rel_output_error and a.weight_sqnr_db == b.weight_sqnr_db
    mem, h_mem = _tensors(tmp_path / "mem.sq")
    ooc, h_ooc = _tensors(res.path)
    assert mem.keys() == ooc.keys()
    for k in mem:
        assert mem[k].dtype == ooc[k].dtype and torch.equal(mem[k], ooc[k]), k
    for key in ("layers", "layer_defaults", "tied", "model", "scale_dtype"):
        assert h_mem.get(key) == h_ooc.get(key), key
    loaded = load(res.path, build=functools.partial(_build, folder))
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert not list(tmp_path.glob("specquant-ooc-*"))  # the private folder is gone


def test_spilled_activations_give_the_same_file(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    folder = _folder(tmp_path, tied=False, layers=3)
    calib, cfg = _calib(), sq.GPTQConfig(bits=4)
    spilled = []
    real = spill.SpilledInputs.__init__

    def counting(self, path, items):
        spilled.append(path)
        real(self, path, items)
    monkeypatch.setattr(spill.SpilledInputs, "__init__", counting)
    a = sq.quantize_folder(folder, cfg, calib, tmp_path / "a.sq", batch_size=4, progress=False, workdir=tmp_path)
    assert a.spilled_bytes == 0 and not spilled
    b = sq.quantize_folder(folder, cfg, calib, tmp_path / "b.sq", activation_budget=0, batch_size=4,
                           progress=False, workdir=tmp_path)
    # every block boundary has two streams (float X and quantized X̃), each 6 × 16 × 32 float32 values
    assert b.spilled_bytes >= 2 * 3 * 6 * 16 * 32 * 4 and len(spilled) >= 6
    assert (tmp_path / "a.sq").read_bytes() == (tmp_path / "b.sq").read_bytes()
    assert not list(tmp_path.glob("specquant-ooc-*"))


def test_a_failure_mid_run_leaves_no_temporary_file_and_no_output(tmp_path, monkeypatch):
    folder = _folder(tmp_path, tied=False)
    from specquant.engine import outofcore

    calls = []
    real = outofcore.quantize_block_layers

    def failing(state, in_block, *args):
        calls.append(in_block)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(state, in_block, *args)
    monkeypatch.setattr(outofcore, "quantize_block_layers", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        sq.quantize_folder(folder, sq.GPTQConfig(bits=4), _calib(), tmp_path / "out" / "q.sq", activation_budget=0,
                           batch_size=4, progress=False, workdir=tmp_path)
    assert len(calls) == 2
    assert not list(tmp_path.glob("specquant-ooc-*"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("text,n", [("3GB", 3 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                    ("1.5 GB", 15 * 10**8), ("4096", 4096)])
def test_parse_memory(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("bad", ["3XB", "", "GB", "-1GB", "0MB", "3 GB extra"])
def test_parse_memory_refuses_bad_values_with_one_line(bad):
    with pytest.raises(ValueError) as e:
        parse_memory(bad)
    assert "\n" not in str(e.value) and "memory size" in str(e.value)


def test_a_limit_that_cannot_be_met_is_refused_before_any_work(tmp_path):
    folder = _folder(tmp_path, tied=True)
    with pytest.raises(ValueError) as e:
        sq.quantize_folder(folder, sq.GPTQConfig(bits=4), _calib(), tmp_path / "q.sq", max_memory="1MB",
                           progress=False, workdir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--max-memory 1 MiB cannot be met") and "largest block" in msg
    assert not (tmp_path / "q.sq").exists() and not list(tmp_path.glob("specquant-ooc-*"))



def test_layers_left_in_float_are_streamed_through_and_written(tmp_path):
    """A decoder block left wholly in float (run, not quantized), and a float block and head after
    the last quantized layer (copied through, not walked): still the in-memory result."""
    torch.set_num_threads(1)
    folder = _folder(tmp_path, tied=False, layers=4)
    cfg = sq.GPTQConfig(bits=4)
    cfg.modules.update({"model.layers.1.*": sq.algorithms.base.ModuleSettings(skip=True),
                        "model.layers.3.*": sq.algorithms.base.ModuleSettings(skip=True),
                        "lm_head": sq.algorithms.base.ModuleSettings(skip=True)})
    calib = _calib()
    _, report = _in_memory(folder, cfg, calib, tmp_path / "mem.sq", batch_size=4)
    res = sq.quantize_folder(folder, cfg, calib, tmp_path / "ooc.sq", batch_size=4, progress=False, workdir=tmp_path)
    assert [r.name for r in res.report.layers] == [r.name for r in report.layers] and len(report.layers) == 14
    mem, _ = _tensors(tmp_path / "mem.sq")
    ooc, _ = _tensors(res.path)
    assert mem.keys() == ooc.keys() and "lm_head.weight" in ooc and "model.layers.1.mlp.down_proj.weight" in ooc
    assert all(torch.equal(mem[k], ooc[k]) for k in mem)


def _tensors_in_cycles() -> int:
    """Tensors that only reference cycles keep alive (found by one collection)."""
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
    finally:
        gc.set_debug(0)
    n = sum(isinstance(o, torch.Tensor) and not o.is_meta for o in gc.garbage)
    gc.garbage.clear()
    gc.collect()
    return n


@pytest.mark.parametrize("cfg", [sq.GPTQConfig(bits=4, granularity="group:16"), sq.GPFQConfig(bits=3)],
                         ids=["gptq", "gpfq"])
def test_the_walk_frees_each_block_without_the_garbage_collector(tmp_path, cfg, collector_off):
    """A block's weights, statistics and activations are freed by reference counting when the
    walk moves on: nothing waits for a collection (on the full 1.5B model, statistics held in
    reference cycles piled up over several blocks, 1.7 GB over the memory limit)."""
    torch.set_num_threads(1)
    folder = _folder(tmp_path, tied=False, layers=3)
    res = sq.quantize_folder(folder, cfg, _calib(), tmp_path / "ooc.sq", batch_size=2, progress=False,
                             workdir=tmp_path)
    assert _tensors_in_cycles() == 0
    blocks = res.to_dict()["block_seconds"]  # each block's resident memory after it was dropped
    assert [b["block"] for b in blocks] == [f"model.layers.{i}" for i in range(3)] + ["lm_head"]
    assert all(0 < b["rss_mb"] <= res.report.peak_rss_mb for b in blocks)
    assert 0 < res.walk_peak_rss_mb <= res.report.peak_rss_mb
