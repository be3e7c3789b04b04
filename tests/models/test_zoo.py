"""The model zoo: registry, calibration data, and the accuracy of every model."""
from __future__ import annotations

import pytest
import torch

from specquant.models import data as D
from specquant.models import zoo
from specquant.models.zoo import ZooEntry, evaluate, get_model, list_models

ZOO_IDS = ["digits-mlp", "mnist-mlp", "resnet20-cifar10", "resnet32-cifar10"]


# --------------------------------------------------------------------------- registry


def test_list_models():
    assert list_models() == ZOO_IDS + ["stories260k", "smollm2-135m"]
    for model_id in ZOO_IDS:
        entry = zoo.get_entry(model_id)
        assert isinstance(entry, ZooEntry) and entry.id == model_id and entry.kind == "classifier"
    assert zoo.get_entry("stories260k").kind == "lm" and zoo.get_entry("smollm2-135m").kind == "lm"


def test_unknown_id_lists_known_ids():
    with pytest.raises(ValueError, match="unknown model id 'resnet18'") as info:
        get_model("resnet18")
    for model_id in ZOO_IDS:
        assert model_id in str(info.value)


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        zoo.register(zoo.get_entry("digits-mlp"))


def test_evaluate_counts_and_restores_mode():
    model = torch.nn.Linear(3, 2)
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
        model.bias.zero_()
    y = torch.tensor([0, 1, 1, 1])  # predictions: 0, 1, 0 (tie), 0 (tie) -> 2 of 4
    model.train()
    assert evaluate(model, x, y, batch_size=3) == pytest.approx(50.0)
    assert model.training
    with pytest.raises(ValueError):
        evaluate(model, x, y[:3])


# --------------------------------------------------------------------------- digits-mlp (no data dir)


def test_digits_mlp():
    model, entry = get_model("digits-mlp")
    assert not model.training and not entry.needs_data_dir
    x, y = entry.test(None)
    assert x.shape == (360, 64)
    assert evaluate(model, x, y) >= 95.0
    # same seed, same weights
    again, _ = get_model("digits-mlp")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_digits_calib_comes_from_train_split():
    entry = zoo.get_entry("digits-mlp")
    xtr, _, xte, _ = D.load_digits_split()
    calib = entry.calib(100, 0, None)
    assert calib.shape == (100, 64)
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    assert torch.equal(calib, xtr[perm[:100]])
    assert torch.equal(entry.calib(100, 0, None), calib)
    assert not torch.equal(entry.calib(100, 1, None), calib)
    with pytest.raises(ValueError, match="only 1437"):
        entry.calib(5000, 0, None)
    with pytest.raises(ValueError, match="positive integer"):
        entry.calib(0, 0, None)


# --------------------------------------------------------------------------- CIFAR-10 ResNets


@pytest.fixture(scope="module")
def cifar_test(data_dir):
    return D.load_cifar10("test", data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("model_id, reference", [("resnet20-cifar10", 91.73), ("resnet32-cifar10", 92.63)])
def test_resnet_reproduces_reference_accuracy(data_dir, cifar_test, model_id, reference):
    model, entry = get_model(model_id, data_dir)
    assert not model.training
    assert entry.reference_accuracy == reference
    x, y = cifar_test
    assert x.shape[0] == 10_000
    assert evaluate(model, x, y) == pytest.approx(reference, abs=0.01)


def test_resnet_missing_weights_is_a_data_error(tmp_path):
    with pytest.raises(D.DataNotFoundError, match="resnet20-cifar10.th"):
        get_model("resnet20-cifar10", tmp_path)


def test_cifar_calib_comes_from_train_10k(data_dir):
    entry = zoo.get_entry("resnet20-cifar10")
    calib = entry.calib(64, 7, data_dir)
    xtr, _ = D.load_cifar10("train", data_dir)
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(7))
    assert calib.shape == (64, 3, 32, 32)
    assert torch.equal(calib, xtr[perm[:64]])


# --------------------------------------------------------------------------- mnist-mlp (trained, cached)


@pytest.fixture(scope="module")
def mnist_cache(data_dir, tmp_path_factory):
    """Train mnist-mlp once into a fresh cache folder (SPECQUANT_CACHE) for this module."""
    cache = tmp_path_factory.mktemp("specquant-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(zoo.CACHE_ENV_VAR, str(cache))
        model, entry = get_model("mnist-mlp", data_dir)
        yield cache, model, entry


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "a"))
    assert zoo.cache_dir() == tmp_path / "a"
    monkeypatch.delenv(zoo.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "specquant"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "specquant"


@pytest.mark.slow
def test_mnist_mlp_trains_once_then_loads_from_cache(mnist_cache, data_dir, monkeypatch):
    cache, model, entry = mnist_cache
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(cache))
    x, y = entry.test(data_dir)
    assert x.shape == (10_000, 784)
    assert evaluate(model, x, y) >= 98.0
    files = sorted(p.name for p in cache.iterdir())
    assert files == [zoo.mnist_mlp_cache_path().name]  # no temporary file left behind

    def no_training(*args, **kwargs):
        raise AssertionError("mnist-mlp was retrained although the cache holds it")

    monkeypatch.setattr(zoo, "train_mlp", no_training)
    again, _ = get_model("mnist-mlp", data_dir)
    assert not again.training
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.slow
def test_mnist_cache_is_safetensors_with_recipe(mnist_cache):
    from safetensors import safe_open

    cache, model, _ = mnist_cache
    with safe_open(str(next(cache.iterdir())), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
        assert '"epochs"' in f.metadata()["recipe"]


def test_mnist_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path))
    path = zoo.mnist_mlp_cache_path()
    path.write_bytes(b"not a safetensors file")
    calls = []

    def fake_train(model, x, y, **kwargs):
        calls.append(kwargs)
        return model.eval()

    monkeypatch.setattr(zoo, "train_mlp", fake_train)
    monkeypatch.setattr(D, "load_mnist", lambda split, data_dir=None: (torch.zeros(4, 784), torch.zeros(4)))
    get_model("mnist-mlp")
    assert len(calls) == 1 and calls[0]["seed"] == 0
    get_model("mnist-mlp")  # now a valid cache: no second training
    assert len(calls) == 1


def test_mnist_calib_comes_from_train(data_dir):
    entry = zoo.get_entry("mnist-mlp")
    calib = entry.calib(512, 0, data_dir)
    xtr, _ = D.load_mnist("train", data_dir)
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
    assert calib.shape == (512, 784)
    assert torch.equal(calib, xtr[perm[:512]])
