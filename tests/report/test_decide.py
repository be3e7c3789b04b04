"""Reports that decide: one bits-per-weight definition split into code, scale and overhead; the
headline (change against float with its noise, size against float); Pareto rows and the
recommended row; the HTML page's headline, collapsed configuration, scroll boxes, captions and
glossary; the mixed run's width plot, budget note and progress with ETA; QuantReport.summary()."""
from __future__ import annotations

import copy
import json
import math

import pytest

import specquant as sq
from specquant.cli import main
from specquant.cli.common import UI, EtaProgress
from specquant.models import get_model
from specquant.report.decide import (
    BitsPerWeight,
    Headline,
    binomial_se,
    mark_sweep,
    pareto_front,
    recommend,
    size_vs_float,
)

from .test_html import parse

pytestmark = pytest.mark.usefixtures("one_thread")

STORAGE = {"file_bytes": 1000, "float_bytes": 200, "codes_bytes": 500, "scale_bytes": 100, "zero_point_bytes": 20,
           "quantized_weights": 1600, "bits_per_weight": (1000 - 200) * 8 / 1600}


def test_bits_per_weight_is_code_plus_scale_plus_overhead():
    b = BitsPerWeight.from_storage(STORAGE)
    assert b.code == 2.5 and b.scale == pytest.approx(0.6) and b.overhead == pytest.approx(0.9)
    assert b.total == pytest.approx(STORAGE["bits_per_weight"]) == pytest.approx(4.0)
    assert "4.000 bits/weight = 2.500 code + 0.600 scale + 0.900 file overhead" == b.text()
    assert BitsPerWeight.from_storage({"quantized_weights": 0}) is None
    assert size_vs_float(STORAGE) == pytest.approx((4 * 1600 + 200) / 1000)


def test_binomial_standard_error():
    assert binomial_se(50.0, 100) == pytest.approx(5.0)
    assert binomial_se(97.5, 360) == pytest.approx(100 * math.sqrt(0.975 * 0.025 / 360))
    assert binomial_se(100.0, 10) == 0.0


def test_headline_text_says_change_noise_size_and_time():
    h = Headline("accuracy", 97.5, 96.0, 400, 7.25, 1.5)
    assert h.change == pytest.approx(-1.5) and h.noise == pytest.approx(binomial_se(96.0, 400))
    t = h.text()
    assert "-1.50 points vs float 97.50 %" in t and "7.2× smaller than float32" in t and "1.5 s" in t
    assert f"± {h.noise:.2f} binomial s.e. on 400 test samples" in t
    p = Headline("perplexity", 100.0, 110.0, 5000, 6.0, None).text()
    assert "+10.000, +10.0 % vs float 100.000" in p
    assert Headline.from_dict(h.to_dict()) == h


def test_pareto_and_recommendation():
    sizes = [2.0, 3.0, 4.0, 3.0, 5.0]
    acc = [90.0, 96.9, 97.4, 96.0, 97.4]
    assert pareto_front(sizes, acc) == [True, True, True, False, False]
    rec = recommend(sizes, acc, float_score=97.5)
    assert rec.index == 2 and "within 0.5 points of float" in rec.rule  # 97.4 is within, 96.9 is not
    none = recommend([1.0, 2.0], [80.0, 85.0], float_score=97.5)
    assert none.index == 1 and none.rule.startswith("no model is within")
    ppl = recommend([2.0, 3.0, 4.0], [150.0, 104.0, 100.5], float_score=100.0, perplexity=True)
    assert ppl.index == 1 and "5 % of float perplexity" in ppl.rule
    rows = [{"bits_per_weight": s, "accuracy": a, "n_test": 100} for s, a in zip(sizes, acc)]
    mark_sweep(rows, 97.5)
    assert [r["recommended"] for r in rows] == [False, False, True, False, False]
    assert rows[0]["change"] == pytest.approx(-7.5) and rows[0]["noise"] == pytest.approx(3.0)


def test_quant_report_summary_states_the_split():
    model, entry = get_model("digits-mlp")
    report = sq.quantize(model, sq.RTNConfig(bits=4), calib=entry.calib(64, 0, None))
    text = report.summary()
    assert "3 layers" in text and f"{report.num_weights:,} weights" in text
    code, total = report.avg_bits, report.bits_per_weight
    assert f"{total:.3f} bits per weight = {code:.3f} code + {total - code:.3f} scale" in text
    assert f"{32 / total:.1f}× smaller than float32" in text and "largest relative output error" in text


def test_quantize_headline_in_json_terminal_and_html(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "digits-mlp", "--method", "gptq", "--bits", "3", "--calib", "64", "--out", str(out),
                 "--json"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    split = m["bits_per_weight_split"]
    assert split["code"] + split["scale"] + split["overhead"] == pytest.approx(m["bits_per_weight"])
    assert split["code"] == pytest.approx(3.0)  # 7 levels: 3 stored bits per code
    h = m["headline"]
    assert h["change"] == pytest.approx(m["accuracy"] - m["float_accuracy"]) and h["n_test"] == 360
    assert m["size_vs_float"] > 5
    assert "points vs float" in cap.err and "× smaller than float32" in cap.err and "file overhead" in cap.err
    page = parse((out / "index.html").read_text(encoding="utf-8"))
    assert "headline" in page.ids and page.details_open == [False]  # configuration collapsed
    assert page.scroll_boxes == len(page.tables)  # every table scrolls inside the page
    assert any("Look for the layers that stand out" in t for t in page.text)  # the caption says what to look at


def test_mixed_run_plots_widths_explains_the_budget_and_reports_progress(tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["quantize", "digits-mlp", "--method", "rtn", "--avg-bits", "3", "--policy", "sensitivity",
                 "--per-channel-bits", "--calib", "64", "--out", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    assert (out / "widths.png").read_bytes()[:4] == b"\x89PNG"
    assert "budget of 3 bits counts code bits only" in m["budget_note"]
    assert f"file stores {m['bits_per_weight']:.3f} bits per weight" in m["budget_note"]
    # Progress over the sensitivity pass (stderr is not a terminal here: quarter lines with an ETA).
    assert "sensitivity pass:" in cap.err and "s left" in cap.err


def test_eta_progress_lines_at_quarters(capsys):
    with EtaProgress(UI(False), "pass", "step") as p:
        for i in range(9):
            p(i, 8)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pass:")]
    assert [ln.split()[1] for ln in lines] == ["2/8", "4/8", "6/8", "8/8"] and "about 0 s left" in lines[-1]


def test_demo_marks_pareto_rows_and_one_recommended(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--calib", "64", "--json", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    runs = m["runs"]
    assert sum(r["recommended"] for r in runs) == 1 and any(r["pareto"] for r in runs)
    rec = runs[m["recommended"]["index"]]
    assert rec["pareto"] and m["recommended"]["rule"] in m["recommended"]["text"]
    ok = [r for r in runs if r["accuracy"] >= m["float_accuracy"] - 0.5]
    if ok:  # the rule: the smallest model within 0.5 points of float
        assert rec["bits_per_weight"] == min(r["bits_per_weight"] for r in ok)
    page = parse((out / "index.html").read_text(encoding="utf-8"))
    summary = page.tables["summary"]
    assert "recommended" in summary[0] and "noise" in summary[0] and "change" in summary[0]


def test_analyze_page_has_a_glossary_for_every_column(tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", "digits-mlp", "--out", str(out), "--quiet"]) == 0
    text = (out / "index.html").read_text(encoding="utf-8")
    page = parse(text)
    assert "glossary" in page.ids and "headline" in page.ids
    header = page.tables["layers"][0]
    for col in header:  # every column is explained, the per-width ones once as NAME_b<B>
        stem, sep, width = col.rpartition("_b")
        key = f"{stem}_b&lt;B&gt;" if sep and width.isdigit() else col
        assert f"<dt>{key}</dt>" in text, col
    assert "y = 1" in text  # the caption points at the bound line


def test_quantize_device_argument_runs_where_the_model_is():
    model, entry = get_model("digits-mlp")
    calib = entry.calib(64, 0, None)
    ref = sq.quantize(copy.deepcopy(model), sq.GPTQConfig(bits=4), calib=calib)
    rep = sq.quantize(model, sq.GPTQConfig(bits=4), calib=calib, device="cpu")
    assert [r.rel_output_error for r in rep.layers] == [r.rel_output_error for r in ref.layers]
    assert all(p.device.type == "cpu" for p in model.parameters())
