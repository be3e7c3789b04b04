"""Static activation quantizers (core.actquant): the grid, the records, sampling, calibration."""
import math

import pytest
import torch

from specquant.core.actquant import (
    ACT_CALIBRATORS,
    ActQuantizer,
    calibrate_activation,
    check_act_calibrator,
    sample_values,
)


def test_fake_quantize_is_the_asymmetric_grid():
    aq = ActQuantizer(bits=4, scale=0.25, zero_point=3)
    x = torch.tensor([-10.0, -0.75, -0.1, 0.0, 0.12, 0.13, 1.0, 100.0])
    # codes: clamp(round(x/0.25) + 3, 0, 15)
    assert aq.codes(x).tolist() == [0, 0, 3, 3, 3, 4, 7, 15]
    assert aq.fake_quantize(x).tolist() == [-0.75, -0.75, 0.0, 0.0, 0.0, 0.25, 1.0, 3.0]
    assert aq.codes(x).dtype == torch.uint8
    assert aq.fake_quantize(x.double()).dtype == torch.float64


@pytest.mark.parametrize("calibrator", ACT_CALIBRATORS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_calibrator_gives_a_valid_quantizer_and_keeps_zero_exact(calibrator, bits):
    g = torch.Generator().manual_seed(0)
    v = torch.relu(torch.randn(20000, generator=g)) * 3 - 0.2  # post-ReLU-like, a few negatives
    aq = calibrate_activation(v, bits, calibrator)
    assert aq.bits == bits and aq.scale > 0 and 0 <= aq.zero_point <= 2**bits - 1
    assert aq.fake_quantize(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # zero padding stays 0
    err = (aq.fake_quantize(v) - v).pow(2).mean()
    assert err < v.pow(2).mean()  # better than quantizing everything to 0
    assert aq.calibrator == check_act_calibrator(calibrator)


def test_mse_beats_minmax_at_low_bits_on_heavy_tails():
    g = torch.Generator().manual_seed(1)
    v = -torch.log(torch.rand(50000, generator=g))  # |Laplace| (exponential): one-signed, heavy tail
    mse, mm = calibrate_activation(v, 4, "mse"), calibrate_activation(v, 4, "minmax")
    e = {k: float((q.fake_quantize(v) - v).pow(2).mean()) for k, q in (("mse", mse), ("minmax", mm))}
    assert e["mse"] < e["minmax"]
    assert mm.scale == pytest.approx(float(v.max()) / 15, rel=1e-6) and mm.zero_point == 0


def test_all_zero_sample_and_unknown_calibrator():
    aq = calibrate_activation(torch.zeros(100), 8, "mse")
    assert aq.scale > 0 and aq.fake_quantize(torch.zeros(2)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown activation calibrator 'l2'; allowed: mse"):
        calibrate_activation(torch.ones(4), 8, "l2")
    assert check_act_calibrator("aciq") == "aciq-laplace"


def test_record_round_trip_and_bad_records():
    aq = calibrate_activation(torch.linspace(-1, 3, 1000), 6, "percentile")
    rec = aq.to_record()
    assert ActQuantizer.from_record(rec) == aq
    bad = [
        ({**rec, "bits": 9}, "activation bits"),
        ({**rec, "bits": True}, "not an integer"),
        ({**rec, "scale": -1.0}, "finite float32 value > 0"),
        ({**rec, "scale": math.inf}, "finite float32 value > 0"),
        ({**rec, "scale": 0.1}, "float32 value"),  # 0.1 is no float32 value
        ({**rec, "scale": "1"}, "must be a number"),
        ({**rec, "zero_point": 64}, r"integer in 0..63"),
        ({**rec, "zero_point": 1.5}, r"integer in 0..63"),
        ({**rec, "calibrator": "magic"}, "calibrator 'magic'"),
        ({k: v for k, v in rec.items() if k != "scale"}, "must have bits, scale"),
        ([1, 2], "must have bits, scale"),
    ]
    for r, match in bad:
        with pytest.raises(ValueError, match=match):
            ActQuantizer.from_record(r)


def test_sample_values_is_seeded_bounded_and_proportional():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, 100, generator=g), torch.randn(100, 100, generator=g) + 10]
    a, b = sample_values(xs, 4000, seed=5), sample_values(xs, 4000, seed=5)
    assert torch.equal(a, b) and a.numel() == 4000
    assert not torch.equal(a, sample_values(xs, 4000, seed=6))
    share = float((a > 5).float().mean())  # the second tensor holds a quarter of the values
    assert 0.2 < share < 0.3
    small = [torch.arange(6.0).reshape(2, 3)]
    assert sample_values(small, 4000).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # few: all of them


@pytest.mark.parametrize("grid", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_activation_quantizer(grid):
    from specquant.core.grid import GridSpec, fake_quantize

    g = torch.Generator().manual_seed(5)
    v = torch.relu(torch.randn(20000, generator=g)) * 3
    aq = calibrate_activation(v, 8, "minmax", grid=grid)
    assert aq.grid == grid and aq.zero_point == 0
    assert aq.scale == pytest.approx(float(v.max()) / GridSpec(8, grid).alpha_steps, rel=1e-6)
    # the same values as the weight grid's rounding, codes are the FP8 bit patterns
    s = torch.tensor([aq.scale])
    assert torch.equal(aq.fake_quantize(v), fake_quantize(v, s, torch.zeros(1), aq.spec))
    assert torch.equal(aq.codes(v).view(aq.spec.fp8.dtype).float() * s, aq.fake_quantize(v))
    assert aq.fake_quantize(torch.zeros(2)).tolist() == [0.0, 0.0]
    mse = calibrate_activation(v, 8, "mse", grid=grid)
    err = {a: float((a.fake_quantize(v) - v).pow(2).mean()) for a in (aq, mse)}
    assert err[mse] <= err[aq] * 1.0001  # the search includes (about) the min-max range
    assert ActQuantizer.from_record(aq.to_record()) == aq and aq.to_record()["grid"] == grid
    assert "grid" not in calibrate_activation(v, 8, "mse").to_record()  # integer records unchanged
    with pytest.raises(ValueError, match=f"an {grid} activation grid has 8 bits, got activation bits 4"):
        calibrate_activation(v, 4, "mse", grid=grid)
    with pytest.raises(ValueError, match="unknown activation grid 'fp4'"):
        calibrate_activation(v, 8, "mse", grid="fp4")


# --------------------------------------------------------------------------- per-token quantizers


def test_per_token_quantizer_gives_each_row_its_own_grid():
    from specquant.core.actquant import TokenActQuantizer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.tensor([0.01, 1.0, 100.0]).reshape(3, 1, 1)  # rows of any size
    for bits in (8, 4):
        y = TokenActQuantizer(bits).fake_quantize(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        rows, yr = x.reshape(-1, 64), y.reshape(-1, 64)
        lo, hi = rows.amin(1).clamp_max(0), rows.amax(1).clamp_min(0)
        step = (hi - lo) / (2 ** bits - 1)  # (rows,) the asymmetric min-max step of each row
        assert bool(((yr - rows).abs() <= step[:, None] / 2 * (1 + 1e-5) + 1e-12).all())  # round to nearest
        assert len(torch.unique(yr[0])) <= 2 ** bits
    # the quantized values are on their own grid: quantizing again changes nothing (up to rounding)
    y8 = TokenActQuantizer(8).fake_quantize(x)
    torch.testing.assert_close(TokenActQuantizer(8).fake_quantize(y8), y8, rtol=0, atol=1e-5 * float(x.abs().max()))


def test_per_token_beats_per_tensor_on_rows_of_different_scale():
    from specquant.core.actquant import TokenActQuantizer

    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, generator=g) * torch.logspace(-2, 2, 16).reshape(16, 1)  # (tokens, channels)
    per_tensor = calibrate_activation(x.reshape(-1), 8, "minmax")
    err_t = ((per_tensor.fake_quantize(x) - x).norm(dim=1) / x.norm(dim=1)).max()
    err_k = ((TokenActQuantizer(8).fake_quantize(x) - x).norm(dim=1) / x.norm(dim=1)).max()
    assert err_k < 0.1 * err_t


def test_per_token_records_round_trip_and_bad_ones_are_one_line():
    from specquant.core.actquant import TokenActQuantizer, act_quantizer_from_record

    aq = TokenActQuantizer(6)
    assert aq.to_record() == {"bits": 6, "granularity": "token"}
    assert act_quantizer_from_record(aq.to_record()) == aq
    static = ActQuantizer(bits=8, scale=0.5, zero_point=3)
    assert act_quantizer_from_record(static.to_record()) == static  # records without granularity: per tensor
    for bad, match in (({"bits": 8, "granularity": "channel"}, "activation granularity 'channel' is not 'token'"),
                       ({"bits": 8, "granularity": "tensor"}, "activation granularity 'tensor' is not 'token'"),
                       ({"bits": 9, "granularity": "token"}, "activation bits"),
                       ({"bits": "8", "granularity": "token"}, "activation bits '8'|activation bits 8 is not"),
                       ({"bits": 8, "granularity": "token", "scale": 1.0}, "per-token activation record must have")):
        with pytest.raises(ValueError, match=match) as e:
            act_quantizer_from_record(bad)
        assert "\n" not in str(e.value)
