"""Plain-text tables for terminals (the CLI prints them on stderr)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from specquant.report.html import fmt


def format_table(rows: Sequence[Mapping], columns: Sequence[str | tuple[str, str]]) -> str:
    """Rows of dicts as an aligned text table. A column is a key or a (key, header) pair;
    text is left-aligned, numbers right-aligned; missing values print as "–", and values of keys
    ending in "seconds" with three decimals."""
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]

    def cell(k, v):
        if k.endswith("seconds") and isinstance(v, float):
            return f"{v:.3f}"
        return fmt(v)

    cells = [[cell(k, r.get(k)) for k, _ in cols] for r in rows]
    numeric = [all(not isinstance(r.get(k), str) for r in rows) for k, _ in cols]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h) in enumerate(cols)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line([h for _, h in cols]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
