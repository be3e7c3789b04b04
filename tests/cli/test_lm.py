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


def test_mixed_precision_is_refused_for_language_models_for_now(data_dir, capsys):
    assert main(["quantize", "stories260k", "--method", "rtn", "--avg-bits", "3", "--policy", "sensitivity",
                 "--quiet", "--data-dir", str(data_dir)]) == 2
    assert "not available for language models" in capsys.readouterr().err
