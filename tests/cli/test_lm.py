"""Language models on the command line: eval prints perplexity, quantize records it, the run
folder evaluates to the recorded figure (stories260k, small settings)."""
import json

from specquant.cli import main


def test_eval_of_a_language_model_prints_perplexity(data_dir, capsys):
    assert main(["eval", "stories260k", "--seq-len", "128", "--eval-windows", "4", "--json", "--quiet",
                 "--data-dir", str(data_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 512 and res["seq_len"] == 128 and res["predicted_tokens"] == 4 * 127
    assert 1 < res["perplexity"] < 512 and res["float_perplexity"] == res["perplexity"]
    assert "accuracy" not in res


def test_quantize_a_language_model_and_evaluate_its_run_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "stories260k", "--method", "gptq", "--bits", "4", "--calib", "8", "--seq-len", "128",
                 "--eval-windows", "4", "--out", str(out), "--json", "--quiet", "--data-dir", str(data_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"perplexity", "float_perplexity", "tokens", "seq_len", "bits_per_weight", "layers"} <= set(res)
    assert res["seq_len"] == 128 and res["tokens"] == 512 and len(res["layers"]) == 35
    assert res["perplexity"] < 1.2 * res["float_perplexity"]  # 4-bit GPTQ stays close to float
    assert main(["eval", str(out), "--json", "--quiet", "--data-dir", str(data_dir)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["verified"] is True and again["seq_len"] == 128  # the run's protocol, from config.json
    assert again["perplexity"] == res["perplexity"] and again["matches_recorded"] is True


def test_mixed_precision_on_a_language_model(data_dir, capsys):
    """The budgeted allocator on a causal LM: sensitivities from the logits, the tied lm_head takes
    no bits (it stays float), the budget holds over the quantized layers."""
    assert main(["quantize", "stories260k", "--method", "rtn", "--avg-bits", "3", "--policy", "sensitivity",
                 "--calib", "4", "--seq-len", "64", "--eval-windows", "2", "--json", "--quiet",
                 "--data-dir", str(data_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    widths = {r["name"]: r["bits"] for r in res["layers"]}
    assert len(widths) == 35 and "lm_head" not in widths and len(set(widths.values())) > 1
    assert res["avg_bits"] <= 3 + 1e-9  # stored code bits (a 3-level 2-bit code takes 1.6)
    assert res["perplexity"] > 0 and res["target_avg_bits"] == 3
