"""``index.html``: one self-contained page per run folder.

The page holds the summary table, every plot (PNG embedded as ``data:image/png;base64`` URIs)
and the per-layer table, with inline CSS and no scripts, so it opens from the file system in
any browser, without a server and without the other files of the folder.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from specquant.io.files import atomic_write_text, dumps

SUMMARY_COLUMNS = (
    "recommended", "pareto", "model", "method", "bits", "avg_bits", "redundancy", "levels", "bits_per_weight",
    "size_vs_float", "accuracy", "float_accuracy", "perplexity", "float_perplexity", "metric", "float_metric",
    "change", "noise", "quant_seconds", "peak_rss_mb", "seed",
)

# Column headers of the summary tables (the JSON key stays in the header's tooltip).
COLUMN_LABELS = {
    "recommended": "recommended", "pareto": "Pareto-optimal", "bits": "code bits", "avg_bits": "avg code bits",
    "bits_per_weight": "bits/weight (file)", "size_vs_float": "× smaller than float", "accuracy": "accuracy %",
    "float_accuracy": "float %", "change": "Δ vs float", "noise": "± s.e. (binomial)", "quant_seconds": "quant s",
    "peak_rss_mb": "peak RSS MB", "float_perplexity": "float ppl", "float_metric": "float metric",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
     color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.t,th.t{text-align:left}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0} figcaption{font-size:0.85em;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em;white-space:pre-wrap;word-break:break-all}
.note{color:#555;font-size:0.9em}
.scroll{overflow-x:auto;max-width:100%}
.headline{background:#eef6ee;border:1px solid #b9dbb9;padding:0.6em 1em;margin:1em 0}
.headline p{margin:0.3em 0}
tr.rec td{background:#fff4c2 !important;font-weight:600}
dl.glossary dt{font-family:monospace;font-weight:600;margin-top:0.4em} dl.glossary dd{margin-left:1.5em;color:#333}
code{word-break:break-all}
"""


def fmt(v) -> str:
    """Compact text for a table cell."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        if abs(v) < 1:
            return f"{v:.4g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return "×".join(str(x) for x in v)
    return str(v)


def _table(rows: Sequence[Mapping], columns: Sequence[str], table_id: str,
           labels: Mapping[str, str] | None = None) -> str:
    """A table inside a horizontally scrollable box (a wide table never widens the page); a row
    with ``recommended`` true is highlighted."""
    labels = labels or {}
    parts = [f'<div class="scroll"><table id="{table_id}">', "<thead><tr>"]
    for c in columns:
        parts.append(f'<th class="t" title="{html.escape(c)}">{html.escape(labels.get(c, c))}</th>')
    parts.append("</tr></thead><tbody>")
    for r in rows:
        parts.append('<tr class="rec">' if r.get("recommended") is True else "<tr>")
        for c in columns:
            v = r.get(c)
            cls = ' class="t"' if isinstance(v, str) else ""
            parts.append(f"<td{cls}>{html.escape(fmt(v))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _columns(rows: Sequence[Mapping], preferred: Sequence[str] | None = None) -> list[str]:
    present: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in present and (k == "shape" or not isinstance(v, (dict, list))):
                present.append(k)
    if preferred is None:
        return present
    return [c for c in preferred if any(c in r and r[c] is not None for r in rows)]


def render_html(*, title: str, summary: Sequence[Mapping], plots: Mapping[str, bytes], layers: Sequence[Mapping],
                config: Mapping | None = None, notes: Sequence[str] = (),
                sections: Sequence[tuple[str, Sequence[Mapping]]] = (), headline: Sequence[str] = (),
                captions: Mapping[str, str] | None = None, glossary: Mapping[str, str] | None = None) -> str:
    """The page as a string (see the module docstring). ``headline``: the lines that decide (shown
    first, boxed); ``sections``: more (heading, rows) tables after the summary; ``captions``: what
    to look at in each plot (by file name); ``glossary``: the meaning of each column of the layer
    table. The configuration JSON is collapsed (``<details>``)."""
    e = html.escape
    captions = captions or {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if headline:
        out.append('<div class="headline" id="headline">' + "".join(f"<p>{e(h)}</p>" for h in headline) + "</div>")
    for n in notes:
        out.append(f'<p class="note">{e(n)}</p>')
    out.append("<h2>Summary</h2>")
    out.append(_table(summary, _columns(summary, SUMMARY_COLUMNS), "summary", COLUMN_LABELS))
    for i, (heading, rows) in enumerate(sections):
        out.append(f"<h2>{e(heading)}</h2>")
        out.append(_table(rows, _columns(rows), f"section-{i}", COLUMN_LABELS))
    if plots:
        out.append("<h2>Plots</h2>")
        for name, png in plots.items():
            b64 = base64.b64encode(png).decode("ascii")
            cap = f"{name}: {captions[name]}" if name in captions else name
            out.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{e(cap)}</figcaption></figure>")
    if layers:
        out.append("<h2>Layers</h2>")
        out.append(_table(layers, _columns(layers), "layers"))
    if glossary:
        out.append('<h2>Columns</h2><dl class="glossary" id="glossary">')
        out.extend(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in glossary.items())
        out.append("</dl>")
    if config is not None:
        out.append("<h2>Configuration</h2>")
        rerun = config.get("command_line") if isinstance(config, Mapping) else None
        if rerun:
            out.append(f"<p>Rerun with: <code>{e(str(rerun))}</code></p>")
        out.append(f"<details><summary>config.json (every setting)</summary><pre>{e(dumps(config))}</pre></details>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_html(path: str | Path, **kwargs) -> Path:
    """Render the page (:func:`render_html` arguments) and write it atomically."""
    return atomic_write_text(path, render_html(**kwargs))
