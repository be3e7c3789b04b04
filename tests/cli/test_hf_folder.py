"""A user's own Hugging Face causal-LM folder on the command line: a tiny random Llama written with
``save_pretrained`` beside a small word-level tokenizer (nothing from a hub), quantized with
``--asymmetric`` groups and ``--protect``, its run folder evaluated back to the recorded figure."""
import json

import pytest
import torch
import transformers

from specquant.cli import main
from specquant.models.hf import folder_entry, is_hf_folder


def _write_folder(folder, data_dir, family="llama"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = (data_dir / "text" / "wikitext2-valid-tokenized.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(text.splitlines(), trainers.WordLevelTrainer(vocab_size=256, special_tokens=["<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    if family == "gpt2":  # GPT-2's projections are transformers Conv1D layers
        cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=48, n_layer=2,
                                      n_head=4)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
        return
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("my-model")
    _write_folder(folder, data_dir)
    return folder


def test_folder_entry_reads_the_folder(hf_folder, data_dir):
    assert is_hf_folder(hf_folder) and not is_hf_folder(hf_folder / "nope")
    entry = folder_entry(hf_folder)
    assert entry.kind == "lm" and entry.extra["seq_len"] == 128  # min(context 128, 2048)
    calib = entry.calib(3, 0, data_dir, seq_len=16)
    assert calib.shape == (3, 16) and int(calib.max()) < 256
    assert torch.equal(calib, entry.calib(3, 0, data_dir, seq_len=16))  # seeded


def test_quantize_a_folder_protect_and_eval_its_run(hf_folder, data_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    args = ["quantize", str(hf_folder), "--method", "gptq", "--bits", "3", "--granularity", "group:16",
            "--asymmetric", "--protect", "model.layers.0.*=8", "--calib", "8", "--seq-len", "32",
            "--eval-windows", "4", "--out", str(out), "--json", "--quiet", "--data-dir", str(data_dir)]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["symmetric"] is False and res["seq_len"] == 32 and res["tokens"] == 128
    bits = {r["name"]: r["bits"] for r in res["layers"]}
    assert len(bits) == 14 and "lm_head" not in bits  # tied to the embeddings: kept float
    assert all(b == (8 if n.startswith("model.layers.0.") else 3) for n, b in bits.items())
    assert main(["eval", str(out), "--json", "--quiet", "--data-dir", str(data_dir)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["verified"] is True and again["perplexity"] == res["perplexity"]
    assert main(["eval", str(hf_folder), "--seq-len", "32", "--eval-windows", "4", "--json", "--quiet",
                 "--data-dir", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == res["float_perplexity"]


def test_a_gpt2_folder_quantizes_and_its_run_evaluates(tmp_path, data_dir, capsys):
    torch.set_num_threads(1)
    folder, out = tmp_path / "gpt2", tmp_path / "run"
    _write_folder(folder, data_dir, family="gpt2")
    assert main(["quantize", str(folder), "--method", "gpfq", "--bits", "4", "--calib", "8", "--seq-len", "32",
                 "--eval-windows", "4", "--out", str(out), "--json", "--quiet", "--data-dir", str(data_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in res["layers"]}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= names and len(names) == 8
    assert res["perplexity"] < 1.5 * res["float_perplexity"]
    assert main(["eval", str(out), "--json", "--quiet", "--data-dir", str(data_dir)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["verified"] is True and again["perplexity"] == res["perplexity"]


def test_bad_protect_is_one_line(capsys):
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--bits", "4", "--protect", "fc1"]) == 2
    err = capsys.readouterr().err
    assert "--protect takes NAME_PATTERN=BITS" in err and len(err.strip().splitlines()) == 1
