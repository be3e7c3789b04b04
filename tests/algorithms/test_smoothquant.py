"""SmoothQuant's migration scales (algorithms/smoothquant.py) against the paper's definition
s_j = max|X_j|^α / max|W_j|^(1−α) (Xiao et al. 2023, eq. 4) and its limiting cases."""
import pytest
import torch

from specquant.algorithms.smoothquant import smoothquant_scales


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    act_max = torch.rand(32, generator=g) * 10 + 0.1  # (N0,)
    act_max[[2, 9]] *= 50  # outlier channels
    Ws = [torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g) * 0.5]  # two consumers (out_i, N0)
    return act_max, Ws


def _wmax(Ws):
    return torch.cat(Ws).abs().amax(dim=0)  # (N0,) column maxima of the stacked weights


def test_scales_follow_the_formula_on_the_stacked_weights():
    act_max, Ws = _data()
    for alpha in (0.0, 0.3, 0.5, 0.8, 1.0):
        s = smoothquant_scales(act_max, Ws, alpha)
        want = act_max.double() ** alpha / _wmax(Ws).double() ** (1 - alpha)
        torch.testing.assert_close(s.double(), want, rtol=1e-6, atol=0)


def test_limits_move_all_the_difficulty_to_one_side():
    act_max, Ws = _data()
    # α = 1: s = max|X|, every smoothed activation channel peaks at 1
    torch.testing.assert_close(act_max / smoothquant_scales(act_max, Ws, 1.0), torch.ones(32))
    # α = 0: s = 1/max|W|, every scaled weight column peaks at 1
    torch.testing.assert_close(_wmax(Ws) * smoothquant_scales(act_max, Ws, 0.0), torch.ones(32))
    # α = 0.5: activations and weights end with the same per-channel peak sqrt(max|X|·max|W|)
    s = smoothquant_scales(act_max, Ws, 0.5)
    torch.testing.assert_close(act_max / s, _wmax(Ws) * s, rtol=1e-5, atol=0)
    torch.testing.assert_close(act_max / s, (act_max * _wmax(Ws)).sqrt(), rtol=1e-5, atol=0)


def test_larger_alpha_flattens_the_activation_range_more():
    act_max, Ws = _data()
    spread = [float((act_max / smoothquant_scales(act_max, Ws, a)).max()
                    / (act_max / smoothquant_scales(act_max, Ws, a)).min()) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in zip(spread, spread[1:])) and spread[-1] == pytest.approx(1.0)


def test_dead_channels_keep_scale_one():
    act_max, Ws = _data()
    act_max[5] = 0.0
    Ws[0][:, 7] = 0
    Ws[1][:, 7] = 0
    s = smoothquant_scales(act_max, Ws, 0.5)
    assert s[5] == 1 and s[7] == 1 and bool(torch.isfinite(s).all())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_alpha_is_one_line(alpha):
    act_max, Ws = _data()
    with pytest.raises(ValueError, match=r"SmoothQuant α must be a number in \[0, 1\]") as e:
        smoothquant_scales(act_max, Ws, alpha)
    assert "\n" not in str(e.value)


def test_shape_mismatch_is_refused():
    act_max, Ws = _data()
    with pytest.raises(ValueError, match=r"does not read 32 input channels"):
        smoothquant_scales(act_max, [torch.randn(4, 31)], 0.5)
