"""Data directory resolution and loaders for the real data sets (MNIST, CIFAR-10, digits).

The data folder is read-only and lives outside the repository (by default ``../shared/data``
next to the project root). Its location is resolved by :func:`data_dir`:

1. an explicit argument (the CLI's ``--data-dir``),
2. the environment variable ``SPECQUANT_DATA``,
3. ``../shared/data`` relative to the current directory,
4. ``../shared/data`` relative to the repository root of this source tree.

Every loader returns float32 inputs already normalised the way the zoo models expect, and
int64 labels.
"""
from __future__ import annotations

import gzip
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "SPECQUANT_DATA"
DEFAULT_RELATIVE = Path("..") / "shared" / "data"

CIFAR10_MEAN = (0.485, 0.456, 0.406)
CIFAR10_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# IDX magic numbers: 0x00000801 = unsigned byte, 1 dimension (labels);
# 0x00000803 = unsigned byte, 3 dimensions (images).
IDX_LABELS_MAGIC = 0x00000801
IDX_IMAGES_MAGIC = 0x00000803


class DataNotFoundError(FileNotFoundError):
    """The data directory (or a file inside it) cannot be found."""


def _repo_default() -> Path:
    # src/specquant/models/data.py -> parents[3] is the repository root.
    return Path(__file__).resolve().parents[3] / DEFAULT_RELATIVE


def _named_dir(value, source: str) -> Path:
    """A data directory the user named explicitly: it must exist (never replaced by a default)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise DataNotFoundError(f"data directory {str(path)!r} ({source}) is a file, not a folder; "
                                f"it must be the folder that holds mnist/, cifar10/, models/")
    if not path.is_dir():
        raise DataNotFoundError(
            f"data directory {str(path)!r} ({source}) does not exist; "
            f"it must hold the shared data (mnist/, cifar10/, models/)"
        )
    return path.resolve()


def data_dir(explicit: str | Path | None = None) -> Path:
    """Return the data directory, resolved in the order documented in the module docstring.

    An explicit argument or ``SPECQUANT_DATA`` that names a missing folder is an error (it is
    never silently replaced by a default).
    """
    if explicit is not None:
        return _named_dir(explicit, "given with --data-dir")
    env = os.environ.get(ENV_VAR)
    if env:
        return _named_dir(env, f"from {ENV_VAR}")
    candidates = [Path.cwd() / DEFAULT_RELATIVE, _repo_default()]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise DataNotFoundError(
        f"data directory not found: expected it at {str(candidates[0].resolve())!r} "
        f"(../shared/data next to the project); set {ENV_VAR} or pass --data-dir to point to it"
    )


def _resolve(explicit: str | Path | None) -> Path:
    # The loaders' ``data_dir`` argument shadows the function of the same name.
    return data_dir(explicit)


def _data_file(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts)
    if path.exists() and not path.is_file():
        raise DataNotFoundError(f"data file {str(path)!r} is a folder or a special file, not a regular file")
    if not path.is_file():
        raise DataNotFoundError(f"missing data file {str(path)!r} in data directory {str(root)!r}")
    return path


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

CIFAR10_FILES = {"test": "test.npz", "train": "train-10k.npz"}


def normalize_cifar(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) RGB -> float32 (N, 3, 32, 32), scaled to [0,1] then normalised."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def read_npz(path: Path, keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of an ``.npz`` file, never unpickling anything; errors name the file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise ValueError(f"no array {missing[0]!r} (it holds {', '.join(f.files) or 'nothing'})")
            return tuple(f[k] for k in keys)
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        if "allow_pickle" in msg:
            msg = "it holds object arrays, which would need unpickling (refused)"
        raise ValueError(f"{path}: not a readable .npz data file: {msg}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:  # truncated or not a zip archive
        raise ValueError(f"{path}: not a readable .npz data file (truncated or corrupted: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e).strip() else ''})") from None


def load_cifar10(
    split: str = "test", data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images and labels.

    ``split="test"``: the 10,000 test images; ``split="train"``: the 10,000-image training
    subset (``train-10k.npz``). Returns x float32 (N, 3, 32, 32) normalised, y int64 (N,).
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"CIFAR-10 split must be one of {sorted(CIFAR10_FILES)}, got {split!r}")
    root = _resolve(data_dir)
    path = _data_file(root, "cifar10", CIFAR10_FILES[split])
    images, labels = read_npz(path, ("x", "y"))
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise ValueError(f"{path}: expected x uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: y has shape {labels.shape}, expected ({images.shape[0]},)")
    return normalize_cifar(images), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# MNIST (gzipped IDX)
# ---------------------------------------------------------------------------------------------

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read a gzipped (or plain) IDX file of unsigned bytes.

    Header (big-endian): int32 magic (0x0000080D, D = number of dimensions), then D int32
    sizes, then the uint8 payload. Raises ValueError naming the file when the magic number,
    the sizes or the payload length do not match.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable IDX file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic & 0xFFFFFFFF:08x}, expected 0x{expected_magic:08x}"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", raw[4:header_len])
    count = int(np.prod(dims))
    if len(raw) - header_len != count:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - header_len} bytes, header {dims} says {count}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_mnist(split: str = "train", data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images and labels: x float32 (N, 784) normalised (mean 0.1307, std 0.3081), y int64."""
    if split not in MNIST_FILES:
        raise ValueError(f"MNIST split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    root = _resolve(data_dir)
    img_name, lbl_name = MNIST_FILES[split]
    images = read_idx(_data_file(root, "mnist", img_name), IDX_IMAGES_MAGIC)
    labels = read_idx(_data_file(root, "mnist", lbl_name), IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    x = (x - MNIST_MEAN) / MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# scikit-learn digits (ships with scikit-learn, offline)
# ---------------------------------------------------------------------------------------------

DIGITS_TEST_SIZE = 360


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, split 1,437 train / 360 test with a seeded permutation.

    Features are standardised with the *training* mean and standard deviation (constant pixels
    get std 1). Returns (x_train, y_train, x_test, y_test): float32 (N, 64) and int64 (N,).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    test_idx, train_idx = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return (
        torch.from_numpy(x[train_idx]),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(x[test_idx]),
        torch.from_numpy(y[test_idx]),
    )


# ---------------------------------------------------------------------------------------------
# WikiText-2 text (perplexity on the raw test split; calibration on the validation split)
# ---------------------------------------------------------------------------------------------

TEXT_FILES = {"test": "wikitext2-raw-test.txt", "valid": "wikitext2-valid-tokenized.txt"}
# The word-level tokenized validation split writes "a-b", "1,000", "3.5" as "a @-@ b", "1 @,@ 000",
# "3 @.@ 5": undone before a language model's own tokenizer sees the text.
WIKITEXT_SPLITS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def load_wikitext(split: str = "test", data_dir: str | Path | None = None) -> str:
    """WikiText-2 text: ``"test"`` the raw test split (for perplexity, never calibration),
    ``"valid"`` the validation split with the ``@-@``-style splits undone (for calibration)."""
    if split not in TEXT_FILES:
        raise ValueError(f"WikiText-2 split must be one of {sorted(TEXT_FILES)}, got {split!r}")
    path = _data_file(_resolve(data_dir), "text", TEXT_FILES[split])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if split == "valid":
        for a, b in WIKITEXT_SPLITS:
            text = text.replace(a, b)
    return text


def stratified_indices(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset of ``n`` samples in which every class of the integer labels
    ``y`` keeps its share (largest-remainder rounding; each class at least one sample when ``n`` is at
    least the number of classes). Floating targets (no classes) give a plain seeded subset.

    A test file sorted by class (CIFAR-10's is) would otherwise give its first class only."""
    total = int(y.shape[0])
    if n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    if y.is_floating_point() or y.ndim != 1:
        return torch.randperm(total, generator=g)[:n].sort().values
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
    for i in order[: n - int(quota.sum())]:
        quota[i] += 1
    if n >= len(classes):  # no class left out: take one from the largest quota for each empty one
        for i in (quota == 0).nonzero().flatten().tolist():
            quota[int(quota.argmax())] -= 1
            quota[i] = 1
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = (y == c).nonzero().flatten()
        picked.append(members[torch.randperm(members.numel(), generator=g)[:q]])
    return torch.cat(picked).sort().values
