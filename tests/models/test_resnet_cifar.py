"""The CIFAR ResNet architecture (no data needed)."""
from __future__ import annotations

import pytest
import torch

from specquant.models.resnet_cifar import BasicBlock, PadShortcut, load_pretrained, resnet20, resnet32


@pytest.mark.parametrize("build, n_params, n_blocks", [(resnet20, 269_722, 3), (resnet32, 464_154, 5)])
def test_parameter_counts_and_names(build, n_params, n_blocks):
    model = build()
    assert sum(p.numel() for p in model.parameters()) == n_params
    names = set(model.state_dict())
    for stage in (1, 2, 3):
        for i in range(n_blocks):
            for part in ("conv1", "bn1", "conv2", "bn2"):
                assert f"layer{stage}.{i}.{part}.weight" in names
    assert {"conv1.weight", "bn1.running_var", "linear.weight", "linear.bias"} <= names
    assert f"layer1.{n_blocks}.conv1.weight" not in names


def test_forward_shapes():
    model = resnet20().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 32, 32)
    out = PadShortcut(8)(x)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    # the first block of stages 2 and 3 downsamples; it has no shortcut parameters
    block = BasicBlock(16, 32, stride=2)
    assert isinstance(block.shortcut, PadShortcut) and not list(block.shortcut.parameters())
    assert block(x).shape == (2, 32, 16, 16)


def test_load_pretrained_strips_module_prefix_and_is_strict(tmp_path):
    src = resnet20()
    state = {f"module.{k}": v for k, v in src.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state, "best_prec1": 0.0}, tmp_path / "ckpt.th")
    dst = load_pretrained(resnet20(), tmp_path / "ckpt.th")
    for k, v in src.state_dict().items():
        if "num_batches_tracked" not in k:
            assert torch.equal(dst.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"ckpt\.th: the checkpoint does not fit the architecture"):
        load_pretrained(resnet32(), tmp_path / "ckpt.th")
