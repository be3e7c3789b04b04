"""Data directory resolution and the MNIST / CIFAR-10 / digits loaders."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from specquant.models import data as D

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- data_dir resolution


def test_explicit_argument_wins_over_env(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    assert D.data_dir(other) == other.resolve()
    assert D.data_dir() == tmp_path.resolve()


def test_env_var_naming_missing_folder_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(D.ENV_VAR, str(missing))
    with pytest.raises(D.DataNotFoundError, match=D.ENV_VAR) as info:
        D.data_dir()
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_explicit_missing_folder_is_an_error(tmp_path):
    with pytest.raises(D.DataNotFoundError, match="--data-dir"):
        D.data_dir(tmp_path / "nowhere")


def test_missing_data_dir_message_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_repo_default", lambda: tmp_path / "no" / "shared" / "data")
    with pytest.raises(D.DataNotFoundError) as info:
        D.data_dir()
    msg = str(info.value)
    assert "\n" not in msg
    assert "SPECQUANT_DATA" in msg and "--data-dir" in msg
    assert str((tmp_path / ".." / "shared" / "data").resolve()) in msg


def test_default_relative_to_cwd(tmp_path, monkeypatch):
    work = tmp_path / "project"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    work.mkdir()
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.chdir(work)
    assert D.data_dir() == (tmp_path / "shared" / "data").resolve()


def test_missing_file_inside_data_dir(tmp_path):
    with pytest.raises(D.DataNotFoundError, match="test.npz"):
        D.load_cifar10("test", tmp_path)


def test_bad_split_names():
    with pytest.raises(ValueError, match="split"):
        D.load_cifar10("valid")
    with pytest.raises(ValueError, match="split"):
        D.load_mnist("valid")


# --------------------------------------------------------------------------- IDX parsing


def _write_idx(path, magic, dims, payload: bytes, compress=True):
    raw = struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims) + payload
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", D.IDX_IMAGES_MAGIC, images.shape, images.tobytes())
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz", D.IDX_IMAGES_MAGIC), images)
    _write_idx(tmp_path / "b", D.IDX_LABELS_MAGIC, (5,), bytes(range(5)), compress=False)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "b", D.IDX_LABELS_MAGIC), np.arange(5))


@pytest.mark.parametrize(
    "case, match",
    [
        ("wrong_magic", "magic"),
        ("truncated_payload", "payload"),
        ("not_gzip", "not a readable IDX"),
        ("empty", "not an IDX"),
    ],
)
def test_read_idx_bad_files(tmp_path, case, match):
    path = tmp_path / "bad.gz"
    if case == "wrong_magic":
        _write_idx(path, D.IDX_LABELS_MAGIC, (4,), bytes(4))
    elif case == "truncated_payload":
        _write_idx(path, D.IDX_IMAGES_MAGIC, (2, 28, 28), bytes(100))
    elif case == "not_gzip":
        path.write_bytes(b"this is not gzip at all")
    else:
        with gzip.open(path, "wb") as f:
            f.write(b"")
    with pytest.raises(ValueError, match=match) as info:
        D.read_idx(path, D.IDX_IMAGES_MAGIC)
    assert str(path) in str(info.value)


def test_load_mnist_bad_file_names_the_file(tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in D.MNIST_FILES["test"]:
        (tmp_path / "mnist" / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="t10k-images"):
        D.load_mnist("test", tmp_path)


# --------------------------------------------------------------------------- real data


def test_mnist_test(data_dir):
    x, y = D.load_mnist("test", data_dir)
    assert x.shape == (10_000, 784) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS
    # the scaled pixels are in [0, 1] before normalisation
    raw = x * D.MNIST_STD + D.MNIST_MEAN
    assert raw.min().item() == pytest.approx(0.0, abs=1e-6)
    assert raw.max().item() == pytest.approx(1.0, abs=1e-6)


def test_mnist_train_normalisation(data_dir):
    x, y = D.load_mnist("train", data_dir)
    assert x.shape == (60_000, 784) and y.shape == (60_000,)
    assert torch.bincount(y, minlength=10).sum().item() == 60_000
    # mean 0.1307 / std 0.3081 are the MNIST training statistics
    assert x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("split", ["test", "train"])
def test_cifar10(data_dir, split):
    x, y = D.load_cifar10(split, data_dir)
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    # normalisation: undoing it gives back exactly the uint8 pixels / 255, channel first
    with np.load(data_dir / "cifar10" / D.CIFAR10_FILES[split]) as f:
        first = f["x"][:8]
    mean = torch.tensor(D.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(1, 3, 1, 1)
    expected = torch.from_numpy(first).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x[:8] * std + mean, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- digits


def test_digits_split():
    xtr, ytr, xte, yte = D.load_digits_split(seed=0)
    assert xtr.shape == (1437, 64) and xte.shape == (360, 64)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    # standardised with training statistics
    assert xtr.mean(0).abs().max().item() < 1e-5
    stds = xtr.std(0, unbiased=False)
    assert ((stds - 1).abs() < 1e-4).logical_or(stds == 0).all()
    # fixed for a seed, different across seeds
    again = D.load_digits_split(seed=0)
    assert torch.equal(again[0], xtr) and torch.equal(again[3], yte)
    assert not torch.equal(D.load_digits_split(seed=1)[3], yte)
