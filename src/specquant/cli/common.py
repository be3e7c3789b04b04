"""Helpers shared by the commands of ``specquant``: the error type, human output on stderr and
progress bars, evaluation, storage measurement, run-folder wiring and JSON emission.

The methods, their configs and their help come from the registry of :mod:`specquant.algorithms`
(``method_names``, ``make_config``, ``get_method``): a registered method is a CLI method.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import platform
import shlex
import sys
import tempfile
import time
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
from specquant.models.data import stratified_indices
from specquant.models.hf import folder_entry, is_hf_folder
from specquant.models.user import (
    UserModelSpec,
    check_data_file,
    check_spec,
    file_calib,
    file_test,
    import_entry_point,
    is_entry_point,
    top1_or_metric,
    user_entry,
)
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


class EtaProgress:
    """``progress(done, total)`` for a long pass: a tqdm bar (rate and ETA) on a terminal, else one
    status line on stderr at each quarter with the time spent and the time left (nothing with
    --quiet). Use as a context manager."""

    def __init__(self, ui: UI, desc: str, unit: str = "step"):
        self.ui, self.desc, self.unit = ui, desc, unit
        self.bar = None
        self.t0 = time.perf_counter()
        self.next_quarter = 1

    def __call__(self, done: int, total: int) -> None:
        if self.ui.progress:
            if self.bar is None:
                self.bar = self.ui.bar(total, self.desc, self.unit)
            self.bar.update(done - self.bar.n)
            return
        if total <= 0 or done == 0 or done * 4 < self.next_quarter * total:
            return
        self.next_quarter = done * 4 // total + 1
        spent = time.perf_counter() - self.t0
        left = spent * (total - done) / done
        self.ui.say(f"{self.desc}: {done}/{total} {self.unit}s, {spent:.0f} s spent, about {left:.0f} s left")

    def __enter__(self) -> EtaProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def resolve_device(text: str | None) -> torch.device:
    """The device of ``--device`` (auto: CUDA when torch sees one); CLIError when it is not there."""
    text = text or "cpu"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: torch sees no CUDA device (torch.cuda.is_available() is False); "
                           "use --device cpu or auto")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: torch sees {torch.cuda.device_count()} CUDA devices")
    return torch.device(text)


def model_outputs(model, x, ui: UI, desc: str = "eval", batch_size: int = 500) -> torch.Tensor:
    """The model's outputs on ``x`` in batches (eval mode restored after), with a progress bar; the
    batches go to the model's device, the outputs come back to the CPU (they are small)."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.inference_mode(), ui.bar(x.shape[0], desc, "sample") as bar:
            for s in range(0, x.shape[0], batch_size):
                out = model(x[s:s + batch_size].to(device))
                out = getattr(out, "logits", out)
                if not isinstance(out, torch.Tensor):
                    raise CLIError(f"the model returned {type(out).__name__}, not a tensor of outputs")
                outs.append(out.detach().float().cpu())
                bar.update(min(batch_size, x.shape[0] - s))
    finally:
        model.train(was_training)
    return torch.cat(outs)


def evaluate(model, x, y, ui: UI, desc: str = "eval", batch_size: int = 500, metric=None) -> float:
    """Top-1 accuracy in percent, or ``metric`` = (name, function(outputs, targets) -> float) of the
    user's, over the test set, with a progress bar over batches."""
    name, fn = metric if metric is not None else (None, None)
    try:
        return top1_or_metric(model_outputs(model, x, ui, desc, batch_size), y, fn, name)
    except ValueError as e:
        raise CLIError(str(e)) from None


def user_code_importable() -> None:
    """Let ``module:function`` names the user typed import modules of the current folder, as
    ``python -m`` and ``python script.py`` do (the console script alone does not)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def user_metric(name: str | None):
    """(name, function) of a ``--metric module:function`` the user typed, or None."""
    if name is None:
        return None
    user_code_importable()
    try:
        return name, import_entry_point(name, "--metric")
    except ValueError as e:
        raise CLIError(str(e)) from None


def entry_metric(entry, args=None, recorded: str | None = None):
    """The metric to score ``entry`` with: ``--metric`` when given, else the one a run recorded
    (``recorded``, or its user-model record's: user code, run only when the user allows that name
    with --allow-entry-point), else None (top-1 accuracy)."""
    name = getattr(args, "metric", None)
    spec = entry.extra.get("user_model")
    recorded = recorded or (spec.metric if spec is not None else None)
    if name is None and recorded is not None:
        allowed = getattr(args, "allow_entry_point", None) or ()
        if recorded not in allowed:
            raise CLIError(f"the run was scored with your metric {recorded!r} (your code, not run unless you say "
                           f"so): pass --metric {recorded} or --allow-entry-point {recorded}")
        name = recorded
    return user_metric(name)


def _spec_of(model: str, args) -> UserModelSpec:
    return UserModelSpec(builder=model, weights=getattr(args, "weights", None),
                         calib_data=getattr(args, "calib_data", None), eval_data=getattr(args, "eval_data", None),
                         metric=getattr(args, "metric", None))


def _with_data_files(entry, args):
    """``entry`` with its calibration / test data replaced by ``--calib-data`` / ``--eval-data``."""
    calib_file, eval_file = getattr(args, "calib_data", None), getattr(args, "eval_data", None)
    if calib_file is None and eval_file is None:
        return entry
    if entry.kind == "lm":
        raise CLIError(f"--calib-data / --eval-data are for classifiers and your own models, not the language model "
                       f"{entry.id!r} (it reads WikiText-2 from the data directory)")
    repl = {}
    if eval_file is not None:
        path = check_data_file(eval_file, "--eval-data")
        repl["test"] = functools.partial(file_test, path)
    if calib_file is not None:
        cpath = check_data_file(calib_file, "--calib-data")
        repl["calib"] = functools.partial(file_calib, cpath)
    return dataclasses.replace(entry, needs_data_dir=entry.needs_data_dir and len(repl) < 2,
                               extra={**entry.extra, "data_files": {"calib_data": calib_file, "eval_data": eval_file}},
                               **repl)


def resolve_entry(model: str, args=None, *, need_calib: bool = True, need_eval: bool = True):
    """The model entry of a CLI model argument: a zoo id, a Hugging Face causal-LM folder, or
    ``module:function`` (the user's builder, with ``--weights``, ``--calib-data``, ``--eval-data``
    from ``args``); data files given for a zoo classifier replace its calibration / test data.
    Checks every named file exists, reads none."""
    try:
        if is_entry_point(model) and not Path(model).exists():
            spec = check_spec(_spec_of(model, args), need_calib=need_calib, need_eval=need_eval)
            user_code_importable()
            return user_entry(spec)
        if getattr(args, "weights", None) is not None:
            raise CLIError("--weights is for your own model given as MODULE:FUNCTION (zoo models and Hugging Face "
                           "folders bring their weights)")
        if is_hf_folder(model):
            return _with_data_files(folder_entry(model), args)
        if Path(model).expanduser().exists():
            raise CLIError(f"{model!r} is neither a zoo id nor a Hugging Face model folder: for your own model give "
                           "MODULE:FUNCTION that builds it, and its weights file with --weights")
        return _with_data_files(get_entry(model), args)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("unknown model id"):
            msg += "; MODEL is a zoo id, a Hugging Face model folder or MODULE:FUNCTION (your own builder)"
        raise CLIError(msg) from None


def load_entry_model(model: str, data_dir, args=None, entry=None):
    """(trained model in eval mode, its entry) for a CLI model argument (see :func:`resolve_entry`)."""
    entry = entry if entry is not None else resolve_entry(model, args)
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


def _user_entry_of(path: Path, args):
    """The entry of the user's model a file was quantized from (its ``meta["user_model"]``), or None;
    ``--eval-data`` / ``--metric`` in ``args`` replace the recorded ones."""
    meta = (sqio.read_header(path).get("meta") or {}) if path.is_file() else {}
    if "user_model" not in meta:
        return None
    try:
        spec = UserModelSpec.from_dict(meta["user_model"], str(path))
        spec = dataclasses.replace(spec, eval_data=getattr(args, "eval_data", None) or spec.eval_data,
                                   metric=getattr(args, "metric", None) or spec.metric)
        return user_entry(check_spec(spec, need_calib=False))
    except ValueError as e:
        raise CLIError(str(e)) from None


def load_saved_model(path: Path, allow_entry_point=None, args=None):
    """(model, entry) of a file written by ``specquant.save`` (a run folder's model file): the
    architecture from the Hugging Face folder it records, else its zoo id, else the builder of the
    user's model it records (imported only when ``allow_entry_point`` names it); CLIError when no
    entry (test set, tokenizer) is known for it."""
    hf_entry = _hf_entry_of(path)
    user = _user_entry_of(path, args) if hf_entry is None else None
    if allow_entry_point:
        user_code_importable()
    model = sqio.load(path, allow_entry_point=allow_entry_point or None,
                      build=hf_entry.build if hf_entry is not None else None)
    if hf_entry is not None:
        return model, hf_entry
    if user is not None:
        return model, user
    zoo_id = getattr(model, "_specquant_model_id", None)
    if not zoo_id:
        raise CLIError(f"{str(path)!r} names no zoo model (it was saved with arch=), so no test set is known")
    return model, _with_data_files(get_entry(zoo_id), args)


def check_data_dir(entry, data_dir) -> None:
    """Fail early, before any work, when the model needs the data directory and it is missing."""
    if entry.needs_data_dir:
        resolve_data_dir(data_dir)


def load_test_set(entry, data_dir, limit: int | None, seed: int = 0):
    """The entry's test inputs and targets; with ``limit``, a seeded subset of ``limit`` samples in
    which every class keeps its share (``models.data.stratified_indices``)."""
    try:
        x, y = entry.test(data_dir)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if limit is not None and limit < x.shape[0]:
        idx = stratified_indices(y, limit, seed)
        x, y = x[idx], y[idx]
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

    A zoo model records its zoo id; the user's own model its builder ``module:function`` and data
    files (``meta["user_model"]``); a Hugging Face folder records no architecture code, only the
    folder (``meta["hf_folder"]``), from whose config.json ``specquant eval`` rebuilds it."""
    folder = entry.extra.get("hf_folder")
    spec = entry.extra.get("user_model")
    if spec is not None:  # the builder's name, imported again on load only when the user allows it
        sqio.save(model, path, arch=spec.builder, meta={**meta, "user_model": spec.to_dict()})
    elif folder is not None:
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
