"""index.html: one self-contained page, parsed with html.parser and checked for its content."""
from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

from specquant.algorithms import method_names
from specquant.cli import main
from specquant.report.html import render_html
from specquant.report.run_folder import plot_layers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Collects tables (id -> rows of cell texts; a header cell reads as its JSON key, the ``title``
    of the ``th``), image sources, figure captions, ``<details>`` and every external reference."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0
        self._table = None
        self._row = None
        self._cell = None
        self._key = None
        self.text: list[str] = []
        self.details_open: list[bool] = []
        self.scroll_boxes = 0
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
            self._key = a.get("title") if tag == "th" else None
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "details":
            self.details_open.append("open" in a)
        elif tag == "div" and a.get("class") == "scroll":
            self.scroll_boxes += 1
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            v = a.get(key)
            if v and not v.startswith("data:") and not v.startswith("#"):
                self.external.append(v)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._key if self._key is not None else "".join(self._cell).strip())
            self._cell = self._key = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


def _check_images(page: Page, n: int) -> None:
    assert len(page.images) == n
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC


def test_render_html_is_self_contained_and_escapes_text():
    layers = [{"name": "fc1", "shape": [8, 4], "rel_output_error": 0.125, "kappa": 3.0},
              {"name": "<script>alert(1)</script>", "shape": [2, 8], "rel_output_error": None, "kappa": float("inf")}]
    png = plot_layers(["fc1", "x"], {"rtn": [0.125, 0.2]}, [3.0, 5.0])
    text = render_html(title="t & <b>", summary=[{"model": "m", "method": "rtn", "bits": 4, "accuracy": 97.5}],
                       plots={"layers.png": png}, layers=layers, config={"seed": 0, "command_line": "specquant x"})
    page = parse(text)
    assert page.scripts == 0 and page.external == []
    _check_images(page, 1)
    summary = page.tables["summary"]
    assert summary[0] == ["model", "method", "bits", "accuracy"] and summary[1] == ["m", "rtn", "4", "97.50"]
    rows = page.tables["layers"]
    assert rows[0] == ["name", "shape", "rel_output_error", "kappa"]
    assert rows[1][0] == "fc1" and rows[2][0] == "<script>alert(1)</script>"  # shown as text, not run
    assert rows[2][2] == "–" and rows[2][3] == "inf"
    assert "<script>alert" not in text and "t &amp; &lt;b&gt;" in text


def test_index_html_of_a_quantize_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "digits-mlp", "--method", "gptq", "--bits", "3", "--calib", "128",
                     "--out", str(out), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    page = parse((out / "index.html").read_text(encoding="utf-8"))
    assert page.scripts == 0 and page.external == []  # readable without a server or the other files
    _check_images(page, 1)
    summary = page.tables["summary"]
    header, row = summary[0], summary[1]
    assert {"model", "method", "bits", "bits_per_weight", "accuracy", "float_accuracy"} <= set(header)
    assert row[header.index("model")] == "digits-mlp" and row[header.index("method")] == "gptq"
    assert row[header.index("accuracy")] == f"{metrics['accuracy']:.2f}"
    layers = page.tables["layers"]
    names = [r[layers[0].index("name")] for r in layers[1:]]
    assert names == [r["name"] for r in metrics["layers"]] == ["fc1", "fc2", "fc3"]
    assert "kappa" in layers[0] and "rel_output_error" in layers[0]
    assert "specquant quantize digits-mlp" in "".join(page.text)  # how to rerun it


def test_index_html_of_the_demo_has_every_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--calib", "64", "--quiet"]) == 0
    page = parse((out / "index.html").read_text(encoding="utf-8"))
    _check_images(page, 3)  # accuracy vs bits, per-layer error and κ, frame error vs redundancy
    summary = page.tables["summary"]
    methods = {r[summary[0].index("method")] for r in summary[1:]}
    assert methods == set(method_names()) and len(summary) == 1 + 3 * len(method_names())  # 2, 3, 4 bits each
    layer_names = {r[page.tables["layers"][0].index("name")] for r in page.tables["layers"][1:]}
    assert layer_names == {"fc1", "fc2", "fc3"}
