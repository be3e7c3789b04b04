"""The classic CIFAR-10 ResNet of He et al. 2016 ("Deep Residual Learning", section 4.2).

Depth 6n + 2: a 3x3 stem convolution, three stages of n basic blocks on 16, 32 and 64
channels at 32x32, 16x16 and 8x8, global average pooling and a linear classifier.
ResNet-20 has n = 3, ResNet-32 has n = 5.

Shortcuts are the parameter-free "option A": when a block changes the shape, the identity
path subsamples the feature map (x[:, :, ::2, ::2]) and zero-pads the new channels, planes//4
on each side. Module names match the pretrained checkpoints in the data directory
(conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padding of the channel dimension."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (B, C, H, W) -> (B, C, H/2, W/2)
        # F.pad pads the last dims first: (W left, W right, H top, H bottom, C front, C back)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # -> (B, C + 2*pad, H/2, W/2)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection: relu(bn2(conv2(relu(bn1(conv1 x)))) + sc(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_planes, H, W)
        out = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))  # (B, planes, H/stride, W/stride)
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``num_blocks[i]`` basic blocks in stage i (16, 32, 64 channels)."""

    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(16, 32, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(32, 64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 32, 32), normalised RGB
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        out = self.layer1(out)  # (B, 16, 32, 32)
        out = self.layer2(out)  # (B, 32, 16, 16)
        out = self.layer3(out)  # (B, 64, 8, 8)
        out = out.mean(dim=(2, 3))  # global average pool -> (B, 64)
        return self.linear(out)  # (B, num_classes)


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 (n = 3, 269,722 parameters for 10 classes)."""
    return ResNetCifar((3, 3, 3), num_classes)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    """ResNet-32 (n = 5, 464,154 parameters for 10 classes)."""
    return ResNetCifar((5, 5, 5), num_classes)


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a legacy checkpoint (a dict with ``state_dict``, keys prefixed ``module.``), strictly.

    Read with ``torch.load(weights_only=True)``: tensors, numbers and plain containers only, so a
    crafted pickle in the data folder cannot run code; a file that needs more is refused with a
    one-line error naming it, and so is a file whose tensors do not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: the checkpoint is not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: refused: the checkpoint holds more than tensors and numbers, and loading it "
                         f"would run code it names ({first[:160]})") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file: one line naming it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first[:160]})") from None
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: the checkpoint holds no state dict of named tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"{path}: the checkpoint does not fit the architecture: "
                         f"{' '.join(lines[1:3]) if len(lines) > 1 else lines[0] if lines else ''}"[:400]) from None
    return model
