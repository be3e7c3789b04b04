"""Shared fixtures.

Tests that read the real data directory (``../shared/data`` or ``$SPECQUANT_DATA``) take the
``data_dir`` fixture (or call :func:`require_data_dir`). When the folder is absent they are
skipped with the reason, except when the environment variable ``CI`` is set: there a missing
data directory is a failure, so that the real-model checks cannot be skipped silently.
"""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    shared 2-core machine OpenMP waits make small ops 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
