"""Shared fixtures.

Tests that read the real data directory (``../shared/data`` or ``$SPECQUANT_DATA``) take the
``data_dir`` fixture (or call :func:`require_data_dir`). When the folder is absent they are
skipped with the reason, except when the environment variable ``CI`` is set: there a missing
data directory is a failure, so that the real-model checks cannot be skipped silently.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from specquant.models.data import DataNotFoundError
from specquant.models.data import data_dir as resolve_data_dir


def require_data_dir() -> Path:
    """The resolved data directory; skip the calling test when absent (fail when CI is set)."""
    try:
        return resolve_data_dir()
    except DataNotFoundError as e:
        reason = str(e)
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and the real data directory is missing: {reason}", pytrace=False)
    pytest.skip(f"real data directory not available ({reason})")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory (read-only). Skips, or fails under CI, when it is missing."""
    return require_data_dir()


def require_module(name: str, extra: str = "runtimes"):
    """``import name``; skip the calling test when it is not installed (fail when CI is set, whose
    set-up installs ``specquant[extra]``)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"{name} is not installed (pip install 'specquant[{extra}]'): {e}"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ort():
    """onnxruntime (with onnx); skips when either is missing, fails when CI is set."""
    require_module("onnx")
    return require_module("onnxruntime")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core machine OpenMP waits make small ops 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def collector_off():
    """The garbage collector off for the test (back on after): what the test frees, reference
    counting alone freed (the out-of-core walk must not wait for a collection)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if enabled:
        gc.enable()
