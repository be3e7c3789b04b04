import pytest
import torch
from torch import nn

from specquant.engine.calibrate import StatsAccumulator, as_batches, find_blocks, layer_rows


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
        nn.Conv1d(4, 6, 5, stride=2, padding=2, dilation=1),
        nn.Conv1d(4, 6, 3, dilation=2, groups=2),
        nn.Linear(4, 6),
    ],
)
def test_rows_reproduce_the_layer(conv):
    """rows @ Wᵀ per group equals the layer's own output: the statistics see what the layer sees."""
    torch.manual_seed(0)
    if isinstance(conv, nn.Linear):
        x = torch.randn(3, 5, 4)
    elif isinstance(conv, nn.Conv1d):
        x = torch.randn(3, 4, 17)
    else:
        x = torch.randn(3, 4, 9, 11)
    with torch.no_grad():
        ref = conv(x)
        rows = layer_rows(conv, x)  # (g, m, N0)
        g = rows.shape[0]
        W = conv.weight.reshape(conv.weight.shape[0], -1)
        per = W.shape[0] // g
        outs = [rows[i] @ W[i * per:(i + 1) * per].T for i in range(g)]  # (m, out/g) each
        y = torch.cat(outs, dim=1) + (conv.bias if conv.bias is not None else 0)
    if isinstance(conv, nn.Linear):
        torch.testing.assert_close(y.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    else:
        B, C = ref.shape[:2]
        ref_rows = ref.reshape(B, C, -1).transpose(1, 2).reshape(-1, C)
        torch.testing.assert_close(y, ref_rows, rtol=1e-5, atol=1e-5)


def test_accumulator_equals_one_shot_products():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, 300, 7, generator=g)
    Xt = X + 0.1 * torch.randn(1, 300, 7, generator=g)
    acc = StatsAccumulator(1, 7)
    for a, b in zip(X.split(64, dim=1), Xt.split(64, dim=1)):
        acc.add(a, b)
    s = acc.stats()[0]
    Xd, Xtd = X[0].double(), Xt[0].double()
    torch.testing.assert_close(s.H, Xtd.T @ Xtd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s.G, Xtd.T @ Xd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s.F, Xd.T @ Xd, rtol=1e-5, atol=1e-4)
    assert s.n_rows == 300
    torch.testing.assert_close(s.mean_x, Xd.mean(0))


def test_as_batches_forms_and_errors():
    x = torch.randn(10, 3)
    assert [b.shape[0] for b in as_batches(x, 4)] == [4, 4, 2]
    assert len(as_batches([(x, torch.zeros(10))], 100)) == 1
    with pytest.raises(ValueError, match="empty"):
        as_batches(torch.empty(0, 3), 4)
    with pytest.raises(ValueError, match="empty"):
        as_batches([], 4)
    with pytest.raises(ValueError, match="needs calibration data"):
        as_batches(None, 4)


def test_blocks_split_containers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert find_blocks(model, ["0", "2.0", "2.1"]) == ["0", "2.0", "2.1"]


def test_accumulator_energy_replaces_f():
    """With the layer's weight, the accumulator records ‖X w_i‖² instead of F = XᵀX, and the
    output error computed from it equals the one computed from F."""
    from specquant.algorithms.common import relative_output_error

    g = torch.Generator().manual_seed(1)
    X = torch.randn(1, 400, 9, generator=g)
    Xt = X + 0.1 * torch.randn(1, 400, 9, generator=g)
    W = torch.randn(5, 9, generator=g)
    full, lean = StatsAccumulator(1, 9), StatsAccumulator(1, 9, weight=W[None], keep_f=False)
    for a, b in zip(X.split(100, dim=1), Xt.split(100, dim=1)):
        full.add(a, b)
        lean.add(a, b)
    sf, sl = full.stats()[0], lean.stats()[0]
    assert sl.F is None
    torch.testing.assert_close(sl.energy, (W.double() @ sf.F * W.double()).sum(1), rtol=1e-5, atol=1e-6)
    W_hat = W + 0.05 * torch.randn(5, 9, generator=g)
    e_full = relative_output_error(W, W_hat, sf.H, sf.G, sf.F)
    e_lean = relative_output_error(W, W_hat, sl.H, sl.G, sl.target_energy(W))
    assert abs(e_full - e_lean) < 1e-5 * max(e_full, 1e-12) + 1e-9
    torch.testing.assert_close(sl.target_energy(W.repeat(3, 1)), sl.energy.repeat(3))
    with pytest.raises(ValueError, match="energies were recorded for 5 rows"):
        sl.target_energy(W[:4])
