"""QAT end to end on tiny models: the loss goes down, the trained codes are written back on the PTQ grid
and layout, and the saved file gives the trained model's outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import specquant as sq
from specquant.core.layouts import grid_layout
from specquant.models.mlp import MLP, train_mlp
from specquant.qat import FakeQuantLayer, QATConfig, crop_flip, finetune, prepare_qat
from specquant.qat.layers import finalize_qat
from specquant.qat.train import start_batch_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 512, seed: int = 0):
    """Random inputs (n, 16) labelled by a random teacher MLP into 4 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g)
    return x, (x @ teacher).argmax(1)


def _ptq(bits: int, **cfg):
    x, y = _data()
    model = train_mlp(MLP((16, 32, 4)), x, y, epochs=20, lr=3e-3, batch_size=64, seed=0)
    sq.quantize(model, sq.RTNConfig(bits=bits, **cfg), calib=x[:128], progress=False)
    return model, x, y


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("lsq", [False, True])
def test_loss_decreases_on_a_tiny_model(lsq):
    model, x, y = _ptq(2)
    before = _loss(model, x, y)
    result = finetune(model, (x, y), QATConfig(batch_size=64, lsq=lsq, optimizer="adam"), epochs=15, lr=3e-3, seed=0)
    after = _loss(model, x, y)  # the model with the written-back codes
    assert after < 0.85 * before, (before, after)
    assert result.epoch_loss[-1] < result.epoch_loss[0]
    assert result.steps == 15 * 8 and result.layers == ["fc1", "fc2"]


def test_first_forward_is_the_ptq_model():
    model, x, _ = _ptq(3)
    ref = model(x).detach()
    prepare_qat(model)
    assert isinstance(model.fc1, FakeQuantLayer)
    assert torch.equal(model(x).detach(), ref)


@pytest.mark.parametrize("bits, granularity", [(1, "channel"), (2, "channel"), (3, "group:5"), (4, "tensor")])
def test_codes_written_back_on_the_ptq_grid_and_file_round_trip(tmp_path, bits, granularity):
    model, x, y = _ptq(bits, granularity=granularity)
    ptq = {n: copy.deepcopy(m.qweight) for n, m in model.named_modules() if hasattr(m, "qweight")}
    finetune(model, (x, y), QATConfig(batch_size=64, lsq=True), epochs=3, lr=0.02, seed=1)
    for name, old in ptq.items():
        mod = model.get_submodule(name)
        qw = mod.qweight
        assert qw.spec == old.spec and qw.granularity == old.granularity and type(qw.layout) is type(old.layout)
        assert qw.layout.to_record() == grid_layout(old.spec, old.shape).to_record()
        assert int(qw.codes.min()) >= old.spec.qmin and int(qw.codes.max()) <= old.spec.qmax
        assert torch.equal(mod.weight.detach(), qw.dequantize())
    # training changed the quantized weights (codes or LSQ scales)
    assert any(not torch.equal(model.get_submodule(n).weight.detach(), q.dequantize()) for n, q in ptq.items())
    path = sq.save(model, tmp_path / "qat.safetensors", arch=lambda: MLP((16, 32, 4)))
    loaded = sq.load(path, build=lambda: MLP((16, 32, 4)), kernel="torch")
    assert torch.equal(loaded(x), model(x))


def test_fixed_scales_stay_and_lsq_scales_move():
    model, x, y = _ptq(2)
    s0 = model.fc1.qweight.scale.clone()
    finetune(model, (x, y), QATConfig(batch_size=64), epochs=2, lr=0.02)
    assert torch.equal(model.fc1.qweight.scale, s0)
    model, x, y = _ptq(2)
    finetune(model, (x, y), QATConfig(batch_size=64, lsq=True), epochs=2, lr=0.02)
    assert not torch.equal(model.fc1.qweight.scale, s0)
    moved = float((model.fc1.qweight.scale - s0).abs().max())
    # Adam moves a parameter by at most about its lr per step: a 1000× smaller lr for the steps
    # (16 steps here) keeps them within 16 × 2e-5 of where PTQ left them
    model, x, y = _ptq(2)
    finetune(model, (x, y), QATConfig(batch_size=64, lsq=True, scale_lr_factor=1e-3), epochs=2, lr=0.02)
    slow = float((model.fc1.qweight.scale - s0).abs().max())
    assert 0 < slow <= 16 * 2e-5 * 1.01 + 1e-6 and slow < moved
    with pytest.raises(ValueError, match="scale_lr_factor must be a finite number > 0"):
        QATConfig(scale_lr_factor=0)


def test_same_seed_same_codes_and_a_loaded_file_trains(tmp_path):
    model, x, y = _ptq(2)
    path = sq.save(model, tmp_path / "ptq.safetensors", arch=lambda: MLP((16, 32, 4)))
    a = sq.load(path, build=lambda: MLP((16, 32, 4)))  # packed layers: unpacked by finetune
    b = sq.load(path, build=lambda: MLP((16, 32, 4)))
    for m in (a, b):
        finetune(m, (x, y), QATConfig(batch_size=64), epochs=2, lr=0.02, seed=5)
    assert torch.equal(a.fc1.qweight.codes, b.fc1.qweight.codes)
    assert torch.equal(a.fc2.qweight.codes, b.fc2.qweight.codes)


def _act_qat(tmp_path, act_bits: int, lsq: bool):
    """W4 RTN with static act_bits inputs, 5 epochs of QAT, saved and loaded: (PTQ input quantizer
    of fc2, trained model, loaded model, loss before, inputs, labels)."""
    x, y = _data()
    model = train_mlp(MLP((16, 32, 4)), x, y, epochs=20, lr=3e-3, batch_size=64, seed=0)
    cfg = sq.RTNConfig(bits=4)
    cfg.act_bits = act_bits
    sq.quantize(model, cfg, calib=x[:128], progress=False)
    aq = model.fc2.act_quant
    before = _loss(model, x, y)
    finetune(model, (x, y), QATConfig(batch_size=64, optimizer="adam", lsq=lsq), epochs=5, lr=3e-3)
    path = sq.save(model, tmp_path / f"w4a{act_bits}.safetensors", arch=lambda: MLP((16, 32, 4)))
    loaded = sq.load(path, build=lambda: MLP((16, 32, 4)), kernel="torch")
    return aq, model, loaded, before, x, y


def test_activation_quantizers_train_through_the_ste_and_are_saved(tmp_path):
    aq, model, loaded, before, x, y = _act_qat(tmp_path, 4, lsq=False)
    assert model.fc2.act_quant == aq and _loss(model, x, y) < before
    assert loaded.fc2.input_quant == aq
    assert torch.equal(loaded(x), model(x))


def test_lsq_learns_the_activation_step_and_saves_it(tmp_path):
    aq, model, loaded, before, x, y = _act_qat(tmp_path, 3, lsq=True)
    new = model.fc2.act_quant
    assert new.scale != aq.scale and (new.bits, new.zero_point) == (aq.bits, aq.zero_point)
    assert _loss(model, x, y) < before
    assert loaded.fc2.input_quant == new
    assert torch.equal(loaded(x), model(x))


def test_kappa_penalty_lowers_kappa():
    model, x, y = _ptq(4)
    ref = copy.deepcopy(model)
    finetune(ref, (x, y), QATConfig(batch_size=64), epochs=5, lr=0.02)
    r = finetune(model, (x, y), QATConfig(batch_size=64, kappa_reg=0.05), epochs=5, lr=0.02)
    assert len(r.epoch_kappa) == 5
    assert sq.spectral.condition_number(model.fc1.weight) < sq.spectral.condition_number(ref.fc1.weight)


def test_crop_flip_is_seeded_and_keeps_shape():
    x = torch.randn(8, 3, 32, 32)
    a = crop_flip(x, torch.Generator().manual_seed(3))
    b = crop_flip(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    # an unshifted, unflipped crop is the image itself: some sample of a large batch is one
    xs = torch.randn(400, 1, 8, 8)
    out = crop_flip(xs, torch.Generator().manual_seed(0), pad=1)
    assert any(torch.equal(out[i], xs[i]) for i in range(400))
    assert any(torch.equal(out[i], xs[i].flip(2)) for i in range(400))


def test_bad_inputs_are_one_line_errors():
    model, x, y = _ptq(2)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        finetune(model, (x, y), epochs=0)
    with pytest.raises(ValueError, match="pair"):
        finetune(model, x)
    with pytest.raises(ValueError, match="integer labels"):
        finetune(model, (x, y.float()))
    with pytest.raises(ValueError, match="needs images"):
        finetune(model, (x, y), QATConfig(augment="crop-flip"))
    with pytest.raises(ValueError, match="no quantized layer"):
        finetune(MLP((16, 4)), (x, y))
    with pytest.raises(ValueError, match="unknown optimizer"):
        QATConfig(optimizer="lion")


def _tiny_conv() -> nn.Module:
    """conv(3→4, 3x3) → ReLU → conv(4→4, 3x3, stride 2) → mean pool → linear(4→3), fresh weights (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_convolutions_train_with_crop_flip_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()  # (96,) in 0..2
    model = _tiny_conv()
    sq.quantize(model, sq.RTNConfig(bits=3), calib=x[:32], progress=False)
    result = finetune(model, (x, y), QATConfig(batch_size=32, augment="crop-flip", lsq=True), epochs=2, lr=1e-2)
    assert result.layers == ["0", "2", "5"] and result.steps == 6
    assert model[2].qweight.codes.shape == (4, 4, 3, 3)
    path = sq.save(model, tmp_path / "conv.safetensors", arch=_tiny_conv)
    loaded = sq.load(path, build=_tiny_conv, kernel="torch")
    assert torch.equal(loaded(x), model(x))


def test_fp8_ptq_results_are_refused_in_one_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(32, 8)
    sq.quantize(model, sq.RTNConfig(bits=8, grid="fp8-e4m3"), calib=x, progress=False)
    with pytest.raises(ValueError, match="layer '0': QAT re-rounds on integer grids; this PTQ result has FP8 weights"):
        prepare_qat(model)


def _conv_task(n: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)  # (N, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()  # (N,) in 0..2
    return x, y


@pytest.mark.parametrize("granularity", ["channel", "group:5"])
def test_batch_norm_starts_as_the_identity_and_folds_exactly(granularity):
    x, _ = _conv_task()
    model = _tiny_conv()
    sq.quantize(model, sq.RTNConfig(bits=2, granularity=granularity), calib=x[:32], progress=False)
    ptq_out = model(x).detach()
    codes = [model[i].qweight.codes.clone() for i in (0, 2)]
    layers = prepare_qat(model, batch_norm=True)
    assert [layer.bn is not None for layer in layers] == [True, True, False]  # convolutions only
    start_batch_norm(model, layers, x, QATConfig(batch_size=32))
    model.eval()
    torch.testing.assert_close(model(x).detach(), ptq_out, rtol=1e-5, atol=1e-5)  # the start is the PTQ model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an arbitrary trained state: positive gains, any shift and statistics
        for layer in layers[:2]:
            bn, c = layer.bn, layer.bn.num_features
            bn.weight.copy_(0.5 + torch.rand(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    trained = model(x).detach()
    finalize_qat(model)
    assert not any(isinstance(m, (FakeQuantLayer, nn.BatchNorm2d)) for m in model.modules())
    for i, before in zip((0, 2), codes):
        assert torch.equal(model[i].qweight.codes, before)  # the fold changed scales and bias, not codes
        assert model[i].bias is not None
    torch.testing.assert_close(model(x).detach(), trained, rtol=1e-5, atol=1e-5)


def test_batch_norm_qat_trains_and_the_saved_file_gives_its_outputs(tmp_path):
    x, y = _conv_task()
    model = _tiny_conv()
    sq.quantize(model, sq.RTNConfig(bits=2), calib=x[:32], progress=False)
    before = _loss(model, x, y)
    cfg = QATConfig(batch_size=32, lsq=True, batch_norm=True, bn_samples=64)
    result = finetune(model, (x, y), cfg, epochs=10, lr=1e-2)
    assert result.config["batch_norm"] is True
    assert _loss(model, x, y) < before
    path = sq.save(model, tmp_path / "conv.safetensors", arch=_tiny_conv)
    loaded = sq.load(path, build=_tiny_conv, kernel="torch")
    assert torch.equal(loaded(x), model(x))


def test_batch_norm_needs_per_channel_scales_and_a_positive_gain():
    x, _ = _conv_task()
    model = _tiny_conv()
    sq.quantize(model, sq.RTNConfig(bits=2, granularity="tensor"), calib=x[:32], progress=False)
    with pytest.raises(ValueError, match="layer '0': batch_norm QAT folds the normalisation into one scale per "
                                         "output channel; this layer's scales are tensor-wise"):
        prepare_qat(model, batch_norm=True)
    model = _tiny_conv()
    sq.quantize(model, sq.RTNConfig(bits=2), calib=x[:32], progress=False)
    layers = prepare_qat(model, batch_norm=True)
    start_batch_norm(model, layers, x, QATConfig(batch_size=32))
    with torch.no_grad():
        layers[1].bn.weight[3] = -1.0
    with pytest.raises(ValueError, match="layer '2': its BatchNorm gain on output channel 3 is"):
        finalize_qat(model)
    with pytest.raises(ValueError, match="bn_samples must be a positive integer"):
        QATConfig(bn_samples=0)


def test_ema_returns_the_moving_average_of_the_trained_parameters():
    model, x, y = _ptq(2)
    path = []  # fc1's bias after every step (the callback runs after the step)
    finetune(model, (x, y), QATConfig(batch_size=64, ema=0.9), epochs=2, lr=1e-2, seed=0,
             progress=lambda done, total: path.append(model.fc1.module.bias.detach().clone()))
    start, _, _ = _ptq(2)
    avg = start.fc1.bias.detach().clone()
    for t, b in enumerate(path, start=1):
        d = min(0.9, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * b
    torch.testing.assert_close(model.fc1.bias.detach(), avg, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(avg, path[-1])  # the average is not the last iterate
    with pytest.raises(ValueError, match=r"ema must be a decay in \[0, 1\)"):
        QATConfig(ema=1.0)
