"""specquant.models: the built-in model zoo and the loaders of its data."""
from specquant.models.data import (
    DataNotFoundError,
    data_dir,
    load_cifar10,
    load_digits_split,
    load_mnist,
)
from specquant.models.mlp import MLP, train_mlp
from specquant.models.resnet_cifar import ResNetCifar, resnet20, resnet32
from specquant.models.zoo import ZooEntry, cache_dir, evaluate, get_entry, get_model, list_models

__all__ = [
    "MLP",
    "DataNotFoundError",
    "ResNetCifar",
    "ZooEntry",
    "cache_dir",
    "data_dir",
    "evaluate",
    "get_entry",
    "get_model",
    "list_models",
    "load_cifar10",
    "load_digits_split",
    "load_mnist",
    "resnet20",
    "resnet32",
    "train_mlp",
]
