"""Helpers shared by the commands of ``specquant``: the error type, human output on stderr and
progress bars, evaluation, storage measurement, run-folder wiring and JSON emission.

The methods, their configs and their help come from the registry of :mod:`specquant.algorithms`
(``method_names``, ``make_config``, ``get_method``): a registered method is a CLI method.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import platform
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

import specquant as sq
import specquant.io as sqio
from specquant import algorithms
from specquant.algorithms import get_method
from specquant.algorithms.base import ModuleSettings, split_method
from specquant.engine.apply import layer_dict, peak_rss_mb  # noqa: F401 - the commands report peak_rss_mb
from specquant.engine.walk import fold_batchnorm
from specquant.eval.perplexity import perplexity
from specquant.io.files import dumps
from specquant.models import get_entry
from specquant.models.data import data_dir as resolve_data_dir
from specquant.models.hf import folder_entry, is_hf_folder
from specquant.report.run_folder import MODEL_FILE, RunFolder, RunFolderError

PROG = "specquant"
FRAME_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)  # redundancies of the frame error-vs-redundancy plot


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Methods: read from the registry of specquant.algorithms (a registered method appears here)
# ---------------------------------------------------------------------------------------------


def make_config(method: str, bits: int, granularity: str = "channel", seed: int = 0,
                redundancy: float | None = None, symmetric: bool = True, protect=(), scale_dtype: str = "float32"):
    """The algorithm config of ``method`` (library defaults for everything not given).

    ``protect``: (module name or pattern, bits or None for float) pairs from ``--protect``, in order;
    they become the config's per-module map (the first matching pattern applies)."""
    kw = {"bits": bits, "granularity": granularity, "seed": seed, "symmetric": symmetric}
    if scale_dtype != "float32":
        kw["scale_dtype"] = scale_dtype
    if protect:
        kw["modules"] = {pattern: (ModuleSettings(skip=True) if b is None else ModuleSettings(bits=b))
                         for pattern, b in protect}
    if redundancy is not None:
        base = split_method(method)[0]  # "awq+frame" is frame with the AWQ pre-step
        if "redundancy" not in {f.name for f in dataclasses.fields(get_method(base).config_type)}:
            raise CLIError(f"--redundancy applies to --method frame only, not {method}")
        kw["redundancy"] = redundancy
    try:
        return algorithms.make_config(method, **kw)
    except ValueError as e:
        raise CLIError(str(e)) from None


def config_dict(config) -> dict:
    return config.to_dict()


# ---------------------------------------------------------------------------------------------
# Human output, evaluation
# ---------------------------------------------------------------------------------------------


class UI:
    """Where human output goes: stderr, unless --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = not quiet and sys.stderr.isatty()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, unit: str = "it"):
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not self.progress, leave=False)


def evaluate(model, x, y, ui: UI, desc: str = "eval", batch_size: int = 500) -> float:
    """Top-1 accuracy in percent, with a progress bar over batches."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode(), ui.bar(x.shape[0], desc, "img") as bar:
            for s in range(0, x.shape[0], batch_size):
                logits = model(x[s:s + batch_size])
                correct += int((logits.argmax(dim=1) == y[s:s + batch_size]).sum())
                bar.update(min(batch_size, x.shape[0] - s))
    finally:
        model.train(was_training)
    return 100.0 * correct / x.shape[0]


def resolve_entry(model: str):
    """The model entry of a CLI model argument: a zoo id, or a Hugging Face causal-LM folder."""
    try:
        if is_hf_folder(model):
            return folder_entry(model)
        return get_entry(model)
    except ValueError as e:
        raise CLIError(str(e)) from None


def load_entry_model(model: str, data_dir):
    """(trained model in eval mode, its entry) for a CLI model argument (see :func:`resolve_entry`)."""
    entry = resolve_entry(model)
    try:
        return entry.load(data_dir).eval(), entry
    except ValueError as e:
        raise CLIError(str(e)) from None


def _hf_entry_of(path: Path):
    """The entry of the Hugging Face folder a file was quantized from (its ``meta["hf_folder"]``), or
    None.  The architecture is rebuilt from that folder's config.json by transformers' own classes
    (no code from the file or the folder runs); the folder must still exist."""
    meta = (sqio.read_header(path).get("meta") or {}) if path.is_file() else {}
    folder = meta.get("hf_folder")
    if not isinstance(folder, str):
        return None
    if not is_hf_folder(folder):
        raise CLIError(f"{str(path)!r} was quantized from the Hugging Face folder {folder!r}, which is gone "
                       "(its config.json rebuilds the architecture)")
    return resolve_entry(folder)


def load_saved_model(path: Path, allow_entry_point=None):
    """(model, entry) of a file written by ``specquant.save`` (a run folder's model file): the
    architecture from the Hugging Face folder it records, else its zoo id (or an allowed entry
    point); CLIError when no entry (test set, tokenizer) is known for it."""
    hf_entry = _hf_entry_of(path)
    model = sqio.load(path, allow_entry_point=allow_entry_point or None,
                      build=hf_entry.build if hf_entry is not None else None)
    if hf_entry is not None:
        return model, hf_entry
    zoo_id = getattr(model, "_specquant_model_id", None)
    if not zoo_id:
        raise CLIError(f"{str(path)!r} names no zoo model (it was saved with arch=), so no test set is known")
    return model, get_entry(zoo_id)


def check_data_dir(entry, data_dir) -> None:
    """Fail early, before any work, when the model needs the data directory and it is missing."""
    if entry.needs_data_dir:
        resolve_data_dir(data_dir)


def load_test_set(entry, data_dir, limit: int | None):
    x, y = entry.test(data_dir)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def folded_float(model, calib):
    """A float copy with BatchNorm folded as the engine folds it (for κ and the frame sweep)."""
    m = copy.deepcopy(model).eval()
    fold_batchnorm(m, calib[: min(8, calib.shape[0])])
    return m


def layer_records(report, kappas: dict) -> list[dict]:
    rows = []
    for r in report.layers:
        d = layer_dict(r)  # "act" only for layers that quantize their input
        d["kappa"] = kappas.get(r.name)
        rows.append(d)
    return rows


# ---------------------------------------------------------------------------------------------
# Storage, run folders, JSON
# ---------------------------------------------------------------------------------------------


def save_and_measure(model, entry, path: Path, meta: dict) -> dict:
    """Save the packed model to ``path`` and return its storage breakdown (file bits per weight).

    A zoo model records its zoo id; a Hugging Face folder records no architecture code, only the
    folder (``meta["hf_folder"]``), from whose config.json ``specquant eval`` rebuilds it."""
    folder = entry.extra.get("hf_folder")
    if folder is not None:
        sqio.save(model, path, arch=entry.build, meta={**meta, "hf_folder": folder})
    else:
        sqio.save(model, path, model_id=entry.id, meta=meta)
    return sqio.storage_breakdown(path)


def measure_storage(model, entry, folder: RunFolder | None, meta: dict) -> dict:
    """Storage of the packed model: saved as the run folder's model file when there is one (into its
    staging folder), else into a temporary folder that is removed."""
    if folder is not None:
        return save_and_measure(model, entry, folder.path / MODEL_FILE, meta)
    with tempfile.TemporaryDirectory(prefix="specquant-") as tmp:
        return save_and_measure(model, entry, Path(tmp) / MODEL_FILE, meta)


def payload_bpw(storage: dict) -> float | None:
    n = storage.get("quantized_weights")
    if not n:
        return None
    return (storage["codes_bytes"] + storage["scale_bytes"] + storage["zero_point_bytes"]) * 8 / n


@contextlib.contextmanager
def staged_run_folder(out: str | None, overwrite: bool) -> Iterator[RunFolder | None]:
    """The run folder of ``--out``, written whole or not at all (``report.run_folder.RunFolder``).

    Checks the target at once (a non-empty folder is refused unless ``--overwrite``), so enter
    it before any long work. Inside the block write into ``folder.path`` (a hidden staging
    folder); a normal exit renames it to the target, an exception or Ctrl-C removes it. Yields
    None without ``--out``.
    """
    if out is None:
        if overwrite:
            raise CLIError("--overwrite needs --out DIR")
        yield None
        return
    try:
        folder = RunFolder(out, overwrite=overwrite)
        with folder:
            yield folder
    except RunFolderError as e:
        raise CLIError(str(e)) from None


def versions() -> dict:
    return {"specquant": sq.__version__, "torch": torch.__version__, "python": platform.python_version()}


def command_line(argv: list[str]) -> str:
    return " ".join([PROG] + [shlex.quote(a) for a in argv])


def emit_json(obj) -> None:
    """Print ``obj`` as one line of strict JSON on stdout (the only thing a command prints there)."""
    sys.stdout.write(dumps(obj, indent=None) + "\n")
    sys.stdout.flush()


def lm_perplexity(model, ids, seq_len: int, windows: int | None, ui: UI, desc: str = "perplexity"):
    """Perplexity on the token stream ``ids`` (``eval.perplexity``), with a progress bar over windows."""
    total = ids.numel() // seq_len if windows is None else min(windows, ids.numel() // seq_len)
    try:
        with ui.bar(total, desc, "window") as bar:
            return perplexity(model, ids, seq_len, windows, progress=bar.update)
    except ValueError as e:
        raise CLIError(str(e)) from None
