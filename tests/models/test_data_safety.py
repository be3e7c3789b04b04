"""A data directory someone else prepared: it cannot run code, and bad files are named."""
import os
import pickle

import numpy as np
import pytest
import torch

from specquant.models.data import DataNotFoundError, load_cifar10
from specquant.models.resnet_cifar import load_pretrained, resnet20


class _Payload:
    """Unpickling this creates the marker file (the harmless stand-in for os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_checkpoint(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker), "best_prec1": 91.0}, f)


def test_a_crafted_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.th"
    _crafted_checkpoint(ckpt, marker)
    with pytest.raises(ValueError, match=r"evil\.th: refused"):
        load_pretrained(resnet20(), ckpt)
    assert not marker.exists()


def test_the_cli_refuses_a_crafted_checkpoint_in_the_data_dir(tmp_path, capsys):
    from specquant.cli import main

    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    marker = tmp_path / "pwned"
    _crafted_checkpoint(data / "models" / "resnet20-cifar10.th", marker)
    assert main(["eval", "resnet20-cifar10", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet20-cifar10.th: refused" in err
    assert not marker.exists()


def test_checkpoint_errors_name_the_file(tmp_path):
    trunc = tmp_path / "trunc.th"
    m = resnet20()
    torch.save({"state_dict": m.state_dict()}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"trunc\.th: not a readable PyTorch checkpoint"):
        load_pretrained(resnet20(), trunc)
    wrong = tmp_path / "wrong.th"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.th: the checkpoint does not fit the architecture"):
        load_pretrained(resnet20(), wrong)
    with pytest.raises(ValueError, match="not a regular file"):
        load_pretrained(resnet20(), tmp_path)


def _cifar_dir(tmp_path):
    d = tmp_path / "data"
    (d / "cifar10").mkdir(parents=True)
    return d


def _good_npz(path, n=4):
    np.savez(path, x=np.zeros((n, 32, 32, 3), np.uint8), y=np.zeros(n, np.uint8))


def test_a_good_small_npz_loads(tmp_path):
    d = _cifar_dir(tmp_path)
    _good_npz(d / "cifar10" / "test.npz")
    x, y = load_cifar10("test", d)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 0, 0]


def test_a_truncated_npz_names_the_file(tmp_path):
    d = _cifar_dir(tmp_path)
    f = d / "cifar10" / "test.npz"
    _good_npz(f, 50)
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"test\.npz: not a readable \.npz data file"):
        load_cifar10("test", d)


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    d = _cifar_dir(tmp_path)
    marker = tmp_path / "pwned"
    np.savez(d / "cifar10" / "test.npz", x=np.array([_Payload(marker)], dtype=object), y=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match=r"test\.npz: .*object arrays"):
        load_cifar10("test", d)
    assert not marker.exists()


def test_a_missing_array_names_the_file(tmp_path):
    d = _cifar_dir(tmp_path)
    np.savez(d / "cifar10" / "test.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match=r"test\.npz: .*no array 'x'"):
        load_cifar10("test", d)


def test_a_folder_where_a_file_is_expected(tmp_path):
    d = _cifar_dir(tmp_path)
    os.mkdir(d / "cifar10" / "test.npz")
    with pytest.raises(DataNotFoundError, match=r"test\.npz' is a folder"):
        load_cifar10("test", d)


def test_a_file_where_the_data_folder_is_expected(tmp_path):
    f = tmp_path / "data"
    f.write_text("not a folder")
    with pytest.raises(DataNotFoundError, match="is a file, not a folder"):
        load_cifar10("test", f)
