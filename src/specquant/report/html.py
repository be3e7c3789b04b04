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
    "model", "method", "bits", "avg_bits", "redundancy", "levels", "bits_per_weight", "accuracy",
    "float_accuracy", "quant_seconds", "peak_rss_mb", "seed",
)

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
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}
.note{color:#555;font-size:0.9em}
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


def _table(rows: Sequence[Mapping], columns: Sequence[str], table_id: str) -> str:
    parts = [f'<table id="{table_id}">', "<thead><tr>"]
    for c in columns:
        parts.append(f'<th class="t">{html.escape(c)}</th>')
    parts.append("</tr></thead><tbody>")
    for r in rows:
        parts.append("<tr>")
        for c in columns:
            v = r.get(c)
            cls = ' class="t"' if isinstance(v, str) else ""
            parts.append(f"<td{cls}>{html.escape(fmt(v))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
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
                sections: Sequence[tuple[str, Sequence[Mapping]]] = ()) -> str:
    """The page as a string (see the module docstring); ``sections``: more (heading, rows) tables
    after the summary."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for n in notes:
        out.append(f'<p class="note">{e(n)}</p>')
    out.append("<h2>Summary</h2>")
    out.append(_table(summary, _columns(summary, SUMMARY_COLUMNS), "summary"))
    for i, (heading, rows) in enumerate(sections):
        out.append(f"<h2>{e(heading)}</h2>")
        out.append(_table(rows, _columns(rows), f"section-{i}"))
    if plots:
        out.append("<h2>Plots</h2>")
        for name, png in plots.items():
            b64 = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{e(name)}</figcaption></figure>")
    if layers:
        out.append("<h2>Layers</h2>")
        out.append(_table(layers, _columns(layers), "layers"))
    if config is not None:
        out.append("<h2>Configuration</h2>")
        rerun = config.get("command_line") if isinstance(config, Mapping) else None
        if rerun:
            out.append(f"<p>Rerun with: <code>{e(str(rerun))}</code></p>")
        out.append(f"<pre>{e(dumps(config))}</pre>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_html(path: str | Path, **kwargs) -> Path:
    """Render the page (:func:`render_html` arguments) and write it atomically."""
    return atomic_write_text(path, render_html(**kwargs))
