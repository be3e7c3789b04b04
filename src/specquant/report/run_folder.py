"""Run folders: what one ``specquant`` command leaves on disk.

A run folder holds

* ``config.json``   everything needed to rerun the command (argv, model, method, bits, seed, the
                    full algorithm config, versions) and the one-line command itself;
* ``metrics.json``  the results (the keys of the CLI contract: model, method, bits / avg_bits,
                    bits_per_weight, accuracy, float_accuracy, quant_seconds, peak_rss_mb, seed,
                    layers); re-running the same command with the same seed reproduces it exactly
                    apart from the keys in :data:`VOLATILE_KEYS` (timings, memory, run_id);
* ``layers.csv``    one row per quantized layer;
* ``model.safetensors`` the packed model (``specquant.io.save``), for ``specquant eval DIR``;
* ``*.png``         plots (matplotlib, Agg backend);
* ``index.html``    one self-contained page (see :mod:`specquant.report.html`).

A run folder appears whole or not at all (:class:`RunFolder`): it is built under a hidden
temporary name beside the target (``.NAME.partial-<pid>-<random>``) and renamed to the target
only once every file is written; a failed or interrupted run removes it. An existing non-empty
target is refused unless the caller asks to overwrite it, and then the old folder is replaced
only at the very end. Every file inside is also written atomically
(:func:`specquant.io.files.atomic_write_bytes`).

This module renders and writes; what the plots show is computed in :mod:`specquant.diagnostics`.

``config.json`` and ``metrics.json`` carry the same ``run_id`` and the SHA-256 of
``model.safetensors`` (``model_sha256``), so :func:`verify_run_folder` can tell when the files of
a folder do not belong together (a model or a metrics file copied in from another run).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import secrets
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from specquant.io.files import atomic_write_bytes, atomic_write_text, fsync_dir, read_json, write_json
from specquant.report import html

# Keys whose values change from one run to the next (wall time, memory, dates, the per-run id).
# They are kept in these clearly named keys only, so that ``strip_volatile(metrics)`` is reproducible.
VOLATILE_KEYS = frozenset({
    "quant_seconds", "eval_seconds", "float_eval_seconds", "load_seconds", "total_seconds",
    "seconds", "peak_rss_mb", "created", "run_id",
})

CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
LAYERS_CSV = "layers.csv"
MODEL_FILE = "model.safetensors"
INDEX_HTML = "index.html"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if v == math.inf else ("-inf" if v == -math.inf else repr(v))
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


def write_csv(path: str | Path, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts as CSV (columns: ``columns`` or the union of the keys in first-seen order);
    shapes are written as ``64x3x3x3``, missing values as empty cells."""
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return atomic_write_text(path, buf.getvalue())


def strip_volatile(obj):
    """``obj`` without the keys of :data:`VOLATILE_KEYS` (at any depth): what must reproduce."""
    if isinstance(obj, Mapping):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Plots (PNG bytes; matplotlib figures rendered by Agg, no pyplot, no display needed)
# ---------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # A fixed "Software" entry and no date keep the PNG bytes reproducible.
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": "specquant"})
    return buf.getvalue()


def plot_accuracy_vs_bits(runs: Sequence[Mapping], float_accuracy: float | None = None,
                          title: str = "accuracy against storage") -> bytes:
    """Top-1 accuracy against true bits per weight, one line per method (runs: dicts with
    method, bits_per_weight, accuracy, bits)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in runs))
    markers = "osD^vP*X"
    labelled: set[tuple[float, int]] = set()
    for i, m in enumerate(methods):
        pts = sorted((r["bits_per_weight"], r["accuracy"], r.get("bits")) for r in runs if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=m)
        for x, y, b in pts:
            key = (round(x, 1), b)
            if b is not None and key not in labelled:  # one "Nb" label per storage point
                labelled.add(key)
                ax.annotate(f"{b}-bit codes", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if float_accuracy is not None:
        ax.axhline(float_accuracy, color="k", ls="--", lw=1, label=f"float ({float_accuracy:.2f} %)")
    ax.set_xlabel("bits per weight (true storage, overhead included)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_layers(names: Sequence[str], errors: Mapping[str, Sequence[float | None]],
                kappas: Sequence[float] | None = None, error_label: str = "relative output error",
                title: str = "per-layer error and condition number", reference: float | None = None,
                reference_label: str = "") -> bytes:
    """Per-layer relative error (one series per label) and, below, κ(W) on a log scale;
    ``reference``: a horizontal line (e.g. y = 1 where a measured/bound ratio means the bound fails)."""
    rows = 2 if kappas is not None else 1
    width = max(6.0, 0.35 * len(names) + 2)
    fig = Figure(figsize=(width, 3.2 * rows))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    ax = axes[0][0]
    x = list(range(len(names)))
    for label, vals in errors.items():
        ax.plot(x, [float("nan") if v is None else v for v in vals], marker="o", ms=3, label=label)
    ax.set_ylabel(error_label)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if reference is not None:
        ax.axhline(reference, color="tab:red", ls="--", lw=1.2, label=reference_label or f"y = {reference:g}")
    if len(errors) > 1 or reference is not None:  # outside, right of the axes: it never hides a point
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if kappas is not None:
        kx = axes[1][0]
        finite = [k if k is not None and math.isfinite(k) else float("nan") for k in kappas]
        kx.bar(x, finite, color="tab:gray")
        kx.set_yscale("log")
        kx.set_ylabel("κ(W) = σmax/σmin")
        kx.grid(alpha=0.3, axis="y")
    bottom = axes[-1][0]
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    return _png(fig)


def plot_widths(names: Sequence[str], widths: Sequence[float], low: Sequence[float], high: Sequence[float],
                budget: float, code_bits: float, file_bits: float | None,
                title: str = "width chosen per layer") -> bytes:
    """The mixed-precision allocation: each layer's mean code width (bars), the range of its rows'
    widths when they differ (whiskers), the budget, the achieved code bits and the file's bits
    per weight (horizontal lines)."""
    width = max(6.0, 0.35 * len(names) + 2)
    fig = Figure(figsize=(width, 4.0))
    ax = fig.subplots()
    x = list(range(len(names)))
    ax.bar(x, widths, color="tab:blue", alpha=0.75, label="mean code width of the layer")
    err = [[w - lo for w, lo in zip(widths, low)], [hi - w for w, hi in zip(widths, high)]]
    if any(hi != lo for lo, hi in zip(low, high)):
        ax.errorbar(x, widths, yerr=err, fmt="none", ecolor="k", capsize=3, lw=1, label="range over its rows")
    ax.axhline(budget, color="tab:red", ls="--", lw=1.2, label=f"budget {budget:g} code bits")
    ax.axhline(code_bits, color="tab:green", ls=":", lw=1.5, label=f"achieved {code_bits:.3f} code bits")
    if file_bits is not None:
        ax.axhline(file_bits, color="tab:purple", ls="-.", lw=1.2, label=f"file {file_bits:.3f} bits/weight")
    ax.set_ylabel("bits per weight")
    ax.set_title(title)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(names) > 3 else -0.2), ncol=2)
    return _png(fig)


def plot_frame_redundancy(sweeps: Sequence[Mapping], title: str = "frame ΣΔ: weight error against redundancy") -> bytes:
    """Relative weight error against redundancy N/d (log-log), one line per code width; each
    point is annotated with its true bits per weight (with one sweep, one thin line per layer)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for sw in sweeps:
        r, e = sw["redundancy"], sw["overall"]
        ax.plot(r, e, marker="o", label=f"{sw['bits']}-bit codes (all layers)")
        for xi, yi, b in zip(r, e, sw["bits_per_weight"]):
            ax.annotate(f"{b:.1f} b/w", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if len(sweeps) == 1:
            for name, errs in sw["layers"].items():
                ax.plot(r, errs, lw=0.8, alpha=0.5, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(sweeps[0]["redundancy"]) if sweeps else [])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("redundancy N/d")
    ax.set_ylabel("‖W − Ŵ‖ / ‖W‖")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


def write_run_folder(out: str | Path, *, config: Mapping, metrics: Mapping, layers: Sequence[Mapping],
                     plots: Mapping[str, bytes] | None = None, summary: Sequence[Mapping] | None = None,
                     title: str = "specquant run", notes: Sequence[str] = (),
                     sections: Sequence[tuple[str, Sequence[Mapping]]] = (), headline: Sequence[str] = (),
                     captions: Mapping[str, str] | None = None, glossary: Mapping[str, str] | None = None) -> Path:
    """Write config.json, metrics.json, layers.csv, the plots and index.html into ``out``.

    ``plots`` maps file names (``"layers.png"``) to PNG bytes; ``summary`` is the rows of the
    summary table of the HTML page (default: one row from ``metrics``); ``headline``, ``captions``
    and ``glossary`` go to :func:`specquant.report.html.render_html`. The packed model is
    written by the caller (``specquant.io.save(model, out / MODEL_FILE, ...)``) before this, so
    that metrics can read its size. ``out`` is meant to be the :attr:`RunFolder.path` of a
    :class:`RunFolder` (so the folder appears whole or not at all), with ``config`` and
    ``metrics`` both holding its :meth:`RunFolder.stamp`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = dict(plots or {})
    for name, png in plots.items():
        atomic_write_bytes(out / name, png)
    write_csv(out / LAYERS_CSV, layers)
    write_json(out / CONFIG_JSON, config)
    write_json(out / METRICS_JSON, metrics)
    html.write_html(out / INDEX_HTML, title=title, summary=summary if summary is not None else [metrics],
                    plots=plots, layers=layers, config=config, notes=notes, sections=sections, headline=headline,
                    captions=captions, glossary=glossary)
    return out


# ---------------------------------------------------------------------------------------------
# Whole-or-nothing run folders, and checking that a folder's files belong together
# ---------------------------------------------------------------------------------------------

RUN_ID_KEY = "run_id"  # the same uuid4 hex in config.json and metrics.json of one run
MODEL_SHA256_KEY = "model_sha256"  # hex SHA-256 of model.safetensors, in both files
PARTIAL_TAG = ".partial-"  # a folder being written: .NAME.partial-<pid>-<random>, beside NAME
OLD_TAG = ".old-"  # an overwritten folder, moved aside for the moment of the swap
HASH_CHUNK_BYTES = 1 << 20


class RunFolderError(ValueError):
    """A run folder cannot be written where asked, or its files do not belong together (one line)."""


def file_sha256(path: str | Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk_bytes`` at a time (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _sibling_name(target: Path, tag: str) -> Path:
    """A hidden name beside ``target``: ``.NAME<tag><pid>-<random>``."""
    return target.with_name(f".{target.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


class RunFolder:
    """A run folder that appears whole or not at all.

    ``RunFolder(target, overwrite=...)`` checks the target at once, before any work: a path that
    exists and is not a folder (or is a symbolic link) is refused, and so is a non-empty folder
    unless ``overwrite`` (an empty folder is fine). Entering the ``with`` block creates a hidden
    staging folder beside the target, ``.NAME.partial-<pid>-<random>`` (same parent, so the final
    rename is atomic); write every file into :attr:`path`. Leaving the block normally renames the
    staging folder to the target; with ``overwrite`` an existing target is moved aside, the new
    folder renamed in and the old one removed, so a run that fails before that leaves the old
    folder as it was. An exception (KeyboardInterrupt included) removes the staging folder; a
    process killed outright can leave only the hidden staging folder, never a half-written
    target. Two runs into one target cannot mix: the second to finish finds the target taken and
    fails (unless ``overwrite``, and then it replaces the first whole). Problems are one-line
    :class:`RunFolderError` s::

        with RunFolder("runs/r1") as run:
            specquant.save(model, run.path / MODEL_FILE, model_id="digits-mlp")
            stamp = run.stamp()  # run_id and the model's SHA-256
            write_run_folder(run.path, config={**config, **stamp}, metrics={**metrics, **stamp}, layers=rows)
        # runs/r1 now holds every file, or does not exist
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False):
        self.target = Path(os.path.abspath(Path(target).expanduser()))
        self.overwrite = overwrite
        self.run_id = uuid.uuid4().hex
        self._staging: Path | None = None
        self.check()

    @property
    def path(self) -> Path:
        """The staging folder to write into (inside the ``with`` block only)."""
        if self._staging is None:
            raise RuntimeError("RunFolder.path exists only inside the 'with' block")
        return self._staging

    def check(self) -> None:
        """Refuse a target that cannot be written (see the class docstring); changes nothing."""
        t = self.target
        if t.is_symlink():
            raise RunFolderError(f"run folder {str(t)!r} is a symbolic link; give a real folder")
        if t.exists() and not t.is_dir():
            raise RunFolderError(f"run folder {str(t)!r} exists and is not a folder")
        try:
            taken = t.is_dir() and not _is_empty_dir(t)
        except OSError as e:
            raise RunFolderError(f"cannot read the run folder {str(t)!r}: {e.strerror or e}") from None
        if taken:
            if not self.overwrite:
                raise RunFolderError(f"run folder {str(t)!r} exists and is not empty; choose a new folder or "
                                     f"pass --overwrite to replace it")
            real = t.resolve()
            with contextlib.suppress(OSError):  # the current folder may be gone
                cwd = Path.cwd().resolve()
                if real == cwd or real in cwd.parents:
                    raise RunFolderError(f"refusing to replace {str(t)!r}: it is or holds the current folder")
            with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
                if real == Path.home().resolve():
                    raise RunFolderError(f"refusing to replace {str(t)!r}: it is the home folder")
        parent = t.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RunFolderError(f"cannot create the run folder {str(t)!r}: {str(parent)!r} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunFolderError(f"cannot create the run folder {str(t)!r}: {str(parent)!r} is not writable")

    def stamp(self) -> dict:
        """What config.json and metrics.json record so that :func:`verify_run_folder` can tell
        their files belong together: ``run_id`` and, once ``model.safetensors`` is written into
        :attr:`path`, ``model_sha256``."""
        stamp = {RUN_ID_KEY: self.run_id}
        model = self.path / MODEL_FILE
        if model.is_file():
            stamp[MODEL_SHA256_KEY] = file_sha256(model)
        return stamp

    def __enter__(self) -> RunFolder:
        if self._staging is not None:
            raise RuntimeError("a RunFolder is entered once")
        self.check()
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            while True:
                staging = _sibling_name(self.target, PARTIAL_TAG)
                try:
                    os.mkdir(staging)  # 0o777 less the umask, like any new folder
                    break
                except FileExistsError:
                    continue
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder {str(self.target)!r}: {e.strerror or e}") from None
        self._staging = staging
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        staging, self._staging = self._staging, None
        if staging is None:
            return
        if exc_type is not None:
            shutil.rmtree(staging, ignore_errors=True)
            return
        try:
            self._commit(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _commit(self, staging: Path) -> None:
        """Rename the finished staging folder to the target (replacing it with ``overwrite``)."""
        t = self.target
        taken = (f"run folder {str(t)!r} was written by another run meanwhile; this run's files are discarded "
                 f"(pass --overwrite to replace it)")
        if t.is_symlink() or (t.exists() and not t.is_dir()):
            raise RunFolderError(f"run folder {str(t)!r} was replaced by something that is not a folder meanwhile; "
                                 f"this run's files are discarded")
        try:
            if not t.exists() or _is_empty_dir(t):
                try:
                    os.rename(staging, t)  # onto a missing or empty folder: atomic
                except OSError:
                    if t.is_dir() and not _is_empty_dir(t):  # filled between the check and the rename
                        raise RunFolderError(taken) from None
                    raise
            elif not self.overwrite:
                raise RunFolderError(taken)
            else:
                aside = _sibling_name(t, OLD_TAG)
                os.rename(t, aside)
                try:
                    os.rename(staging, t)
                except BaseException:
                    os.rename(aside, t)
                    raise
                shutil.rmtree(aside, ignore_errors=True)
        except OSError as e:
            raise RunFolderError(f"cannot move the run folder into place at {str(t)!r}: {e.strerror or e}") from None
        fsync_dir(t.parent)


def verify_run_folder(folder: str | Path) -> bool:
    """Check that the files of a run folder belong together.

    Returns True when config.json and metrics.json record the same ``run_id`` and the SHA-256 of
    model.safetensors is the ``model_sha256`` they record (a folder without a model must record
    none); False when neither file records a ``run_id`` or ``model_sha256`` (a folder written by a
    specquant before these keys: nothing to check against). Otherwise raises a one-line
    :class:`RunFolderError` that names the file that does not belong. The model is hashed in chunks.
    """
    folder = Path(folder)
    where = f"run folder {str(folder)!r} is inconsistent"
    docs: dict[str, dict | None] = {}
    for name in (METRICS_JSON, CONFIG_JSON):  # metrics first: it is named first in messages
        try:
            doc = read_json(folder / name)
        except (OSError, ValueError):
            doc = None
        docs[name] = doc if isinstance(doc, dict) else None
    stamped = [n for n, d in docs.items() if d is not None and (RUN_ID_KEY in d or MODEL_SHA256_KEY in d)]
    if not stamped:
        return False
    for name, doc in docs.items():
        if name not in stamped:
            other = stamped[0]
            state = "missing or unreadable" if doc is None else f"from an older run (it records no {RUN_ID_KEY})"
            raise RunFolderError(f"{where}: {name} is {state}, unlike {other}")
    meta, conf = docs[METRICS_JSON], docs[CONFIG_JSON]
    model = folder / MODEL_FILE
    actual = file_sha256(model) if model.is_file() else None
    bad = [n for n, d in docs.items() if d.get(MODEL_SHA256_KEY) != actual]
    if meta.get(RUN_ID_KEY) != conf.get(RUN_ID_KEY):
        if len(bad) == 1:
            good = CONFIG_JSON if bad[0] == METRICS_JSON else METRICS_JSON
            raise RunFolderError(f"{where}: {bad[0]} is from another run (its {RUN_ID_KEY} and model SHA-256 differ "
                                 f"from {good}'s and {MODEL_FILE}'s)")
        raise RunFolderError(f"{where}: {CONFIG_JSON} and {METRICS_JSON} are from different runs "
                             f"({RUN_ID_KEY} differs)")
    if bad:
        if actual is None:
            raise RunFolderError(f"{where}: {MODEL_FILE} is missing but {bad[0]} records one")
        raise RunFolderError(f"{where}: {MODEL_FILE} is not the model {bad[0]} describes (SHA-256 differs)")
    return True
