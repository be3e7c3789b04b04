"""stories260k: the llama2.c checkpoint as a Hugging Face Llama, its tokenizer, and quantization."""
import copy

import pytest
import torch

import specquant as sq
from specquant.eval.perplexity import perplexity
from specquant.io import load, save
from specquant.models import get_model, zoo
from specquant.models.data import load_wikitext
from specquant.models.llama2c import BOS_ID, Llama2cTokenizer, greedy_generate


@pytest.fixture(scope="module")
def stories(data_dir):
    model, entry = get_model("stories260k", data_dir)
    return model, zoo.stories_tokenizer(data_dir), entry


def test_greedy_decoding_from_bos_reproduces_the_reference_sentence(stories):
    model, tok, _ = stories
    text = tok.decode(greedy_generate(model, [BOS_ID], 40))
    assert text.startswith("Once upon a time, there was a little girl named Lily. "
                           "She loved to play outside in the park.")


def _naive_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """llama2.c's encode over the whole text at once (quadratic; the reference for short texts)."""
    toks = [tok.ids.get(ch.encode()) for ch in " " + text]
    assert None not in toks
    while True:
        best = max(((tok.scores[t], i, t) for i in range(len(toks) - 1)
                    if (t := tok.ids.get(tok.pieces[toks[i]] + tok.pieces[toks[i + 1]])) is not None), default=None)
        if best is None:
            return [BOS_ID] + toks
        toks[best[1]:best[1] + 2] = [best[2]]


def test_word_by_word_encoding_equals_whole_text_merging(stories):
    _, tok, _ = stories
    text = load_wikitext("valid")[:1500]
    text = "".join(ch for ch in text if ch.encode() in tok.ids)  # the reference has no byte fallback
    assert tok.encode(text) == _naive_encode(tok, text)
    assert tok.decode(tok.encode(text)) == text


def test_the_architecture_matches_the_checkpoint(stories):
    model, _, entry = stories
    fresh = entry.build()
    assert sum(p.numel() for p in model.parameters()) == 260_032
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_w8_perplexity_within_one_percent_and_the_file_round_trips(stories, data_dir, tmp_path):
    model, _, entry = stories
    ids, _ = entry.test(data_dir)
    calib = entry.calib(8, 0, data_dir, seq_len=128)
    assert calib.shape == (8, 128) and calib.dtype == torch.int64
    base = perplexity(model, ids, 128, max_windows=8)
    q = copy.deepcopy(model)
    report = sq.quantize(q, sq.RTNConfig(bits=8), calib=calib, progress=False)
    assert len(report.layers) == 35  # 5 blocks × 7 projections; the tied lm_head stays float
    assert any(s.name == "lm_head" and "tied" in s.reason for s in report.skipped)
    assert all(r.rel_output_error > 0 for r in report.layers)  # statistics inside the decoder blocks
    w8 = perplexity(q, ids, 128, max_windows=8)
    assert abs(w8.perplexity / base.perplexity - 1) < 0.01
    loaded = load(save(q, tmp_path / "s.sq", model_id="stories260k"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert perplexity(loaded, ids, 128, max_windows=8).perplexity == w8.perplexity


def test_gpfq_at_4_bits_keeps_the_block_outputs_closer_than_rtn(stories, data_dir):
    model, _, entry = stories
    calib = entry.calib(8, 0, data_dir, seq_len=128)
    errs = {}
    for cfg in (sq.RTNConfig(bits=4), sq.GPFQConfig(bits=4)):
        report = sq.quantize(copy.deepcopy(model), cfg, calib=calib, progress=False)
        errs[cfg.method] = sum(r.rel_output_error for r in report.layers)
    assert errs["gpfq"] < errs["rtn"]
