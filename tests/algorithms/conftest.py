import pytest
import torch

from specquant.algorithms.base import LayerStats


def _stats_from(X: torch.Tensor, Xt: torch.Tensor) -> LayerStats:
    """Covariance statistics straight from explicit (m, N0) input matrices."""
    X, Xt = X.double(), Xt.double()
    return LayerStats(H=Xt.T @ Xt, G=Xt.T @ X, F=X.T @ X, n_rows=X.shape[0], mean_x=X.mean(0), mean_xt=Xt.mean(0))


@pytest.fixture
def layer_data():
    """A layer with correlated ReLU inputs, and perturbed 'quantized-model' inputs."""
    g = torch.Generator().manual_seed(0)
    m, n0, out = 600, 48, 24
    A = torch.randn(n0, n0, generator=g) / n0**0.5
    X = torch.relu(torch.randn(m, n0, generator=g) @ A + 0.1)
    Xt = X + 0.05 * torch.randn(m, n0, generator=g)
    W = torch.randn(out, n0, generator=g) / n0**0.5
    return W, X, Xt


@pytest.fixture
def stats_from():
    """Function building LayerStats from explicit X, X̃."""
    return _stats_from
