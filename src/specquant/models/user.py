"""The user's own model on the command line: ``specquant quantize mypkg.models:build --weights
W.safetensors --calib-data calib.npz --eval-data test.npz``.

``module:function`` names the user's own code: the CLI imports it because the user typed it (the
same choice as ``import mypkg`` in a script).  The entry it becomes is not registered in the zoo;
a file quantized from it records the builder's name, and loading that file imports the builder
again only when the user allows exactly that name (``--allow-entry-point``, see SECURITY.md).

Data files (calibration inputs; evaluation inputs and targets), read without unpickling:

* ``.npz``  array ``x`` (N, ...) of inputs and, for evaluation, array ``y`` (N,) of targets
  (``numpy.savez``; object arrays are refused);
* ``.pt``   a ``torch.save``-d dict ``{"x": tensor, "y": tensor}`` (or one tensor of inputs, for
  calibration), read with ``torch.load(weights_only=True)``: tensors and plain containers only;
* ``.txt``  one sample per line, numbers separated by spaces or commas, ``#`` starts a comment;
  for evaluation the last number of each line is the target.  Inputs are flat vectors.

Floating inputs become float32, integer inputs int64 (e.g. token ids); integer targets are class
labels (top-1 accuracy), floating targets need a metric of the user's (``--metric module:function``,
called as ``metric(outputs, targets) -> float`` on the whole evaluation set).

Weights (``--weights``): a ``.safetensors`` state dict (or a ``.pt`` one, read with
``weights_only=True``), loaded with ``strict=True``.  Without it the builder's own weights are used.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specquant.models.data import read_npz
from specquant.models.zoo import DataDir, ZooEntry, seeded_subset

DATA_SUFFIXES = (".npz", ".pt", ".txt")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_ENTRY_POINT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

DATA_FORMAT_HELP = (".npz with array x (N, ...) [and y (N,) for --eval-data], .pt holding {'x': tensor, 'y': tensor} "
                    "(read with weights_only=True), or .txt with one sample per line (numbers separated by spaces or "
                    "commas; for --eval-data the last number is the target); integer targets are class labels")


def is_entry_point(text: str) -> bool:
    """Whether ``text`` reads ``package.module:function`` (dotted identifiers on both sides)."""
    return isinstance(text, str) and _ENTRY_POINT.fullmatch(text) is not None


def import_entry_point(text: str, what: str) -> Callable:
    """Import the user's ``module:function`` (``what`` names its role in errors): the caller runs
    this only for a name the user typed or allowed."""
    if not is_entry_point(text):
        raise ValueError(f"{what} must read MODULE:FUNCTION (e.g. mypkg.models:build), got {text!r}")
    mod_name, _, attr = text.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{what} {text!r}: cannot import module {mod_name!r} ({e}); is it on PYTHONPATH or in "
                         "the current folder?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {text!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {text!r} is not callable")
    return obj


@dataclass(frozen=True)
class UserData:
    """Inputs (and targets, for evaluation) read from a user's data file."""

    x: torch.Tensor  # (N, ...) float32 or int64
    y: torch.Tensor | None  # (N,) or (N, ...): int64 class labels or float32 targets; None for calibration


def _as_tensor(a, path: Path, key: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a.detach()
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{path}: {key!r} must be numeric, got {t.dtype}")
    if t.is_floating_point():
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(dim=1).nonzero()[0]) if t.ndim else 0
            raise ValueError(f"{path}: {key!r} holds NaN or inf (sample {bad})")
    else:
        t = t.to(torch.int64)
    return t.contiguous()


def _read_txt(path: Path, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            vals = [float(v) for v in line.split()]
        except ValueError:
            raise ValueError(f"{path}:{no}: not a line of numbers: {line[:60]!r}") from None
        if rows and len(vals) != len(rows[0]):
            raise ValueError(f"{path}:{no}: {len(vals)} numbers, but the first line has {len(rows[0])}")
        rows.append(vals)
    if not rows:
        raise ValueError(f"{path}: no samples (one sample per line, numbers separated by spaces or commas)")
    a = np.asarray(rows, dtype=np.float64)
    if not labelled:
        return a, None
    if a.shape[1] < 2:
        raise ValueError(f"{path}: an evaluation line needs the inputs and then the target, got one number")
    y = a[:, -1]
    if np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return a[:, :-1], y


def _read_pt(path: Path, labelled: bool):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle naming code, a truncated file: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable .pt data file (tensors only, weights_only=True): {first}") from None
    if isinstance(obj, torch.Tensor):
        if labelled:
            raise ValueError(f"{path}: an evaluation file needs inputs and targets: save {{'x': inputs, 'y': targets}}")
        return obj, None
    if not isinstance(obj, dict) or "x" not in obj:
        keys = f" with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else ""
        raise ValueError(f"{path}: expected a dict with key 'x' (inputs){' and y (targets)' if labelled else ''}, "
                         f"got {type(obj).__name__}{keys}")
    if labelled and "y" not in obj:
        raise ValueError(f"{path}: no key 'y' (the targets); it holds {', '.join(sorted(map(str, obj)))}")
    return obj["x"], obj.get("y") if labelled else None


def read_data_file(path, labelled: bool) -> UserData:
    """The inputs (and, when ``labelled``, targets) of a ``.npz`` / ``.pt`` / ``.txt`` data file
    (formats in the module docstring); every problem is one ``ValueError`` line naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = read_npz(path, ("x", "y") if labelled else ("x",)) + ((None,) if not labelled else ())
    elif suffix == ".pt":
        x, y = _read_pt(path, labelled)
    elif suffix == ".txt":
        x, y = _read_txt(path, labelled)
    else:
        raise ValueError(f"data file {str(path)!r}: unknown format {suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(DATA_SUFFIXES)}")
    xt = _as_tensor(x, path, "x")
    if xt.ndim == 0 or xt.shape[0] == 0:
        raise ValueError(f"{path}: 'x' holds no samples (shape {tuple(xt.shape)})")
    yt = None
    if labelled:
        yt = _as_tensor(y, path, "y")
        if yt.ndim == 0 or yt.shape[0] != xt.shape[0]:
            raise ValueError(f"{path}: 'y' has shape {tuple(yt.shape)} but 'x' has {xt.shape[0]} samples")
    return UserData(xt, yt)


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a state dict file into ``model`` (strict); errors name the file and the first bad key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
        else:
            raise ValueError(f"unknown format {suffix or '(no suffix)'!r}; use .safetensors (or .pt)")
    except Exception as e:  # noqa: BLE001 - any reader failure is one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"weights file {str(path)!r}: cannot read it: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} is not a state dict (names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"no tensor {missing[0]!r} the model has" if missing else f"tensor {unexpected[0]!r} the model lacks"
        raise ValueError(f"weights file {str(path)!r} does not fit the model: {what} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"weights file {str(path)!r}: {k!r} has shape {tuple(v.shape)}, the model's is "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)
    return model


@dataclass(frozen=True)
class UserModelSpec:
    """Everything that names a user model and its data (absolute paths), as a file records it."""

    builder: str  # "module:function" returning the nn.Module
    weights: str | None = None  # state dict file, or None: the builder's own weights
    calib_data: str | None = None  # calibration inputs (.npz / .pt / .txt)
    eval_data: str | None = None  # evaluation inputs and targets
    metric: str | None = None  # "module:function": metric(outputs, targets) -> float; None: top-1 accuracy

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where: str) -> UserModelSpec:
        """The spec a file recorded; ``where`` names the file in errors."""
        if not isinstance(d, dict) or not is_entry_point(d.get("builder")):
            raise ValueError(f"{where}: its user_model record has no valid 'builder' (module:function)")
        kw = {}
        for f in dataclasses.fields(cls):
            v = d.get(f.name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}: user_model.{f.name} must be a string, got {type(v).__name__}")
            kw[f.name] = v
        if kw["metric"] is not None and not is_entry_point(kw["metric"]):
            raise ValueError(f"{where}: user_model.metric {kw['metric']!r} is not module:function")
        return cls(**kw)


def check_data_file(path: str, option: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> str:
    """The absolute path of the file ``option`` names, after checking it exists and has a known
    suffix (no data is read)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{option} {path!r}: no such file")
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path!r}: unknown format {p.suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(suffixes)}")
    return str(p.resolve())


def check_spec(spec: UserModelSpec, *, need_calib: bool, need_eval: bool = True) -> UserModelSpec:
    """``spec`` with absolute paths, after checking that each named file exists (before any work)."""
    if need_eval and spec.eval_data is None:
        raise ValueError(f"model {spec.builder!r} is your own code, so specquant knows no test set for it: give "
                         "--eval-data FILE (inputs and targets)")
    if need_calib and spec.calib_data is None:
        raise ValueError(f"model {spec.builder!r} is your own code, so specquant knows no calibration data for it: "
                         "give --calib-data FILE (inputs)")
    return dataclasses.replace(
        spec, weights=None if spec.weights is None else check_data_file(spec.weights, "--weights", WEIGHT_SUFFIXES),
        calib_data=None if spec.calib_data is None else check_data_file(spec.calib_data, "--calib-data"),
        eval_data=None if spec.eval_data is None else check_data_file(spec.eval_data, "--eval-data"))


def _build(builder: str) -> nn.Module:
    fn = import_entry_point(builder, "model builder")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 - the user's builder failing is one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"model builder {builder!r} failed: {type(e).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model builder {builder!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def file_calib(path: str, n: int, seed: int = 0, data_dir: DataDir = None) -> torch.Tensor:
    """``n`` calibration inputs of the data file ``path``, chosen by a seeded permutation."""
    return seeded_subset(read_data_file(path, labelled=False).x, n, seed, path)


def file_test(path: str, data_dir: DataDir = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the evaluation data file ``path``."""
    d = read_data_file(path, labelled=True)
    return d.x, d.y


def _no_test(data_dir: DataDir = None):
    raise ValueError("no --eval-data given: your model has no test set")


def user_entry(spec: UserModelSpec) -> ZooEntry:
    """A model entry (kind "classifier": inputs in, outputs scored against targets; not registered)
    for the user's builder and data files (``spec`` checked by :func:`check_spec`)."""

    def load(data_dir: DataDir = None) -> nn.Module:
        model = _build(spec.builder)
        if spec.weights is not None:
            load_weights(model, spec.weights)
        return model.eval()

    def calib(n: int, seed: int = 0, data_dir: DataDir = None) -> torch.Tensor:
        if spec.calib_data is None:
            raise ValueError(f"model {spec.builder!r}: no --calib-data given")
        return file_calib(spec.calib_data, n, seed)

    return ZooEntry(id=spec.builder, kind="classifier", description=f"your model {spec.builder}",
                    build=functools.partial(_build, spec.builder), load=load, calib=calib,
                    test=functools.partial(file_test, spec.eval_data) if spec.eval_data else _no_test, input_shape=(),
                    needs_data_dir=False, extra={"user_model": spec})


def top1_or_metric(outputs: torch.Tensor, targets: torch.Tensor, metric: Callable | None, name: str) -> float:
    """The score of ``outputs`` against ``targets``: the user's ``metric`` when given, else top-1
    accuracy in percent (integer targets needed)."""
    if metric is not None:
        try:
            v = metric(outputs, targets)
            v = float(v.item() if isinstance(v, torch.Tensor) else v)
        except Exception as e:  # noqa: BLE001 - the user's metric failing is one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"metric {name!r} failed: {type(e).__name__}: {first}") from None
        if not math.isfinite(v):
            raise ValueError(f"metric {name!r} returned {v}, not a finite number")
        return v
    if targets.is_floating_point():
        raise ValueError("the evaluation targets are not integers (class labels); give --metric MODULE:FUNCTION "
                         "to score them")
    return 100.0 * float((outputs.argmax(dim=1) == targets).float().mean())
