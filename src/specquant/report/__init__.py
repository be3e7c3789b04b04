"""specquant.report: run folders (JSON, CSV, PNG plots) and their self-contained HTML page."""
from specquant.report.html import render_html, write_html
from specquant.report.run_folder import (
    VOLATILE_KEYS,
    atomic_write_bytes,
    atomic_write_text,
    strip_volatile,
    write_csv,
    write_json,
    write_run_folder,
)

__all__ = [
    "VOLATILE_KEYS",
    "atomic_write_bytes",
    "atomic_write_text",
    "render_html",
    "strip_volatile",
    "write_csv",
    "write_html",
    "write_json",
    "write_run_folder",
]
