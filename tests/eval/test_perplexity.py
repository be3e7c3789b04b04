"""The perplexity protocol: windows, token counts, and the NLL against a hand computation."""
import math

import pytest
import torch
from torch import nn

from specquant.eval.perplexity import calibration_windows, perplexity, token_windows


class Bigram(nn.Module):
    """Logits from a fixed table: log-probabilities of the next token given the current one."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V) log-probabilities

    def forward(self, ids):  # (B, T) -> (B, T, V)
        return self.table[ids]


def test_windows_are_non_overlapping_from_the_start():
    ids = torch.arange(10)
    w = token_windows(ids, 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the tail of 2 is dropped
    assert token_windows(ids, 4, max_windows=1).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(ids, 11)
    with pytest.raises(ValueError, match="1-D integer"):
        token_windows(ids.float(), 4)


def test_perplexity_equals_the_hand_computed_mean_nll():
    g = torch.Generator().manual_seed(0)
    V = 7
    table = torch.log_softmax(torch.randn(V, V, generator=g), dim=1)
    ids = torch.randint(0, V, (103,), generator=g)
    res = perplexity(Bigram(table), ids, seq_len=10, batch_size=3)
    windows = ids[:100].view(10, 10)
    nll = -sum(float(table[w[t], w[t + 1]]) for w in windows for t in range(9)) / 90
    assert res.windows == 10 and res.tokens == 100 and res.predicted == 90 and res.seq_len == 10
    assert res.nll == pytest.approx(nll, rel=1e-6) and res.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    V = 11
    res = perplexity(Bigram(torch.full((V, V), -math.log(V))), torch.randint(0, V, (64,)), seq_len=8, max_windows=3)
    assert res.perplexity == pytest.approx(V) and res.windows == 3 and res.predicted == 21


def test_calibration_windows_are_seeded():
    ids = torch.arange(1000)
    a, b = calibration_windows(ids, 5, 16, seed=1), calibration_windows(ids, 5, 16, seed=1)
    assert torch.equal(a, b) and a.shape == (5, 16)
    assert bool((a[:, 1:] - a[:, :-1] == 1).all())  # contiguous slices of the stream
    assert not torch.equal(a, calibration_windows(ids, 5, 16, seed=2))
