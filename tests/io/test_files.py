"""The one atomic writer and the one strict-JSON helper (specquant.io.files)."""
from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import specquant.io.files as files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "a.json"
    assert files.atomic_write_text(p, "first") == p  # missing folders are created
    files.atomic_write_text(p, "second")
    assert p.read_text() == "second"
    assert sorted(os.listdir(p.parent)) == ["a.json"]
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the mode of any new file, not 0600
    files.atomic_write_bytes(str(p), b"\x00\xff")  # str paths too
    assert p.read_bytes() == b"\x00\xff"


def test_atomic_write_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        files.atomic_write_bytes(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "private").stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, exc):
    p = tmp_path / "m.json"
    files.atomic_write_text(p, "old")

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(type(exc)):
        files.atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_a_write_that_fails_while_writing_leaves_no_temporary(tmp_path, monkeypatch):
    def boom(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(files.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        files.atomic_write_bytes(tmp_path / "new.bin", b"data")
    assert os.listdir(tmp_path) == []


def test_jsonable_converts_what_strict_json_cannot_hold():
    obj = {"a": math.inf, "b": [1.5, float("nan"), -math.inf], "t": torch.tensor([1, 2]), "t0": torch.tensor(2.5),
           "shape": (3, 4), "s": {7}, 3: "int key", "p": Path("x/y"), "n": np.float32(0.5), "i": np.int64(7),
           "arr": np.arange(3), "nan32": np.float32("nan"), "ok": [None, True, 0, "s", 1e-3], "other": object}
    got = files.jsonable(obj)
    assert got == {"a": None, "b": [1.5, None, None], "t": [1, 2], "t0": 2.5, "shape": [3, 4], "s": [7],
                   "3": "int key", "p": "x/y", "n": 0.5, "i": 7, "arr": [0, 1, 2], "nan32": None,
                   "ok": [None, True, 0, "s", 1e-3], "other": str(object)}
    assert type(got["i"]) is int and type(got["ok"][1]) is bool
    json.dumps(got, allow_nan=False)  # strict JSON holds it


def test_dumps_and_write_json_are_strict_and_keep_key_order(tmp_path):
    obj = {"z": 1, "a": [math.nan], "m": {"k": math.inf}}
    text = files.dumps(obj)
    assert text == json.dumps({"z": 1, "a": [None], "m": {"k": None}}, indent=2)
    assert files.dumps(obj, indent=None) == '{"z": 1, "a": [null], "m": {"k": null}}'
    p = files.write_json(tmp_path / "m.json", obj)
    assert p.read_text() == text + "\n"
    assert files.read_json(p) == {"z": 1, "a": [None], "m": {"k": None}}


@pytest.mark.parametrize("text", ['{"a": NaN}', "[Infinity]", "-Infinity", '{"a": 1', "", "[" * 100_000])
def test_loads_refuses_non_finite_constants_and_bad_json_with_value_error(text, tmp_path):
    with pytest.raises(ValueError):
        files.loads(text)
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError):
        files.read_json(tmp_path / "bad.json")


def test_loads_reads_strict_json_text_and_bytes():
    assert files.loads('{"a": [1, 2.5, null, true]}') == {"a": [1, 2.5, None, True]}
    assert files.loads(b'{"a": 1}') == {"a": 1}


def test_files_imports_nothing_of_specquant():
    """io/files.py sits in io: it may import the standard library, numpy and torch only."""
    tree = ast.parse(Path(files.__file__).read_text(encoding="utf-8"))
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "specquant" for m in modules), modules
