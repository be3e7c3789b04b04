"""specquant.report: renders run folders (JSON, CSV, PNG plots) and their self-contained HTML
page. File writing and strict JSON live in :mod:`specquant.io.files`; what the plots show is
computed in :mod:`specquant.diagnostics`."""
from specquant.report.html import render_html, write_html
from specquant.report.run_folder import (
    VOLATILE_KEYS,
    strip_volatile,
    write_csv,
    write_run_folder,
)

__all__ = [
    "VOLATILE_KEYS",
    "render_html",
    "strip_volatile",
    "write_csv",
    "write_html",
    "write_run_folder",
]
