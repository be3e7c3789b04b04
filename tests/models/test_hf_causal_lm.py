"""Any Hugging Face causal LM through the Python API: tiny randomly initialised models written
with ``save_pretrained`` in a temporary folder (nothing from a hub), calibrated with tokenizer-style
dict batches, quantized, saved packed and loaded back to identical logits, tied embeddings kept."""
import copy
import functools

import pytest
import torch
import transformers

import specquant as sq
from specquant.io import SQFormatError, load, save


def _tiny(family: str, folder):
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    cls(cfg).save_pretrained(folder)
    return cls.from_pretrained(folder).eval()


def _build_from(folder):
    """The user's own builder: the architecture from the folder's config.json, fresh weights."""
    config = transformers.AutoConfig.from_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("cfg", [sq.GPTQConfig(bits=4, granularity="group:16", symmetric=False),
                                 sq.GPFQConfig(bits=3)], ids=["gptq-g16-asym", "gpfq-w3"])
def test_quantize_save_load_identical_logits(tmp_path, family, cfg):
    torch.set_num_threads(1)
    folder = tmp_path / family
    model = _tiny(family, folder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (8, 24), generator=g)
    calib = [{"input_ids": ids[:4], "attention_mask": torch.ones(4, 24, dtype=torch.long)},
             {"input_ids": ids[4:], "attention_mask": torch.ones(4, 24, dtype=torch.long)}]
    float_model = copy.deepcopy(model)
    report = sq.quantize(model, cfg, calib=calib, progress=False)
    assert len(report.layers) == 2 * 7 + (family == "qwen2")  # q, k, v, o, gate, up, down per block (+ untied head)
    assert all(r.rel_output_error > 0 for r in report.layers)
    if family == "llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    build = functools.partial(_build_from, folder)
    path = save(model, tmp_path / "q.sq", arch=build)
    loaded = load(path, build=build)
    x = torch.randint(0, 96, (2, 16), generator=g)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    if family == "llama":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with pytest.raises(SQFormatError, match="pass build="):  # a partial has no importable name: none recorded
        load(path)


def test_padded_tokenizer_batches_are_refused_with_a_clear_error(tmp_path):
    model = _tiny("llama", tmp_path / "m")
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long),
             "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}
    with pytest.raises(ValueError, match="calibration batch 0: the attention_mask pads"):
        sq.quantize(model, sq.RTNConfig(bits=4), calib=batch, progress=False)
