import torch
from torch import nn

from specquant.engine.walk import fold_batchnorm, forward_order, skipped_modules


class Net(nn.Module):
    """Registration order differs from call order; a BN reads a conv output also used elsewhere."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 5)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 8, 1)
        self.bn_c = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = x + self.bn_b(self.conv_b(x))
        y = self.conv_c(x)
        x = self.bn_c(y) + y  # conv_c's output is read twice: its BN must not be folded
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.norm(self.head(x))


def randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def test_forward_order_follows_calls_not_registration():
    model = Net().eval()
    assert forward_order(model, torch.randn(2, 3, 16, 16)) == ["conv_a", "conv_b", "conv_c", "head"]


def test_fold_batchnorm_keeps_outputs_and_skips_shared_tensors():
    torch.manual_seed(0)
    model = Net().eval()
    randomize_bn(model)
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    folded = fold_batchnorm(model, x)
    pairs = {(f.bn, f.into) for f in folded}
    assert pairs == {("bn_a", "conv_a"), ("bn_b", "conv_b")}
    assert isinstance(model.bn_a, nn.Identity) and isinstance(model.bn_c, nn.BatchNorm2d)
    assert model.conv_b.bias is not None  # a bias was created for the bias-free conv
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_skipped_modules_say_why():
    model = Net().eval()
    skipped = {s.name: s.reason for s in skipped_modules(model, {"conv_a", "conv_b", "head"}, {"bn_a"})}
    assert "norm" in skipped and "LayerNorm" in skipped["norm"]
    assert "conv_c" in skipped and "excluded" in skipped["conv_c"]
    assert "bn_c" in skipped and "BatchNorm" in skipped["bn_c"]
    assert "bn_a" not in skipped


def test_resnet20_folds_every_batchnorm_every_time(data_dir):
    """All 19 BNs of ResNet-20 follow a conv directly; the pairing must not depend on tensor ids."""
    from specquant.models.zoo import get_model

    x = torch.randn(2, 3, 32, 32)
    counts = set()
    for _ in range(3):
        model, _entry = get_model("resnet20-cifar10", data_dir)
        counts.add(len(fold_batchnorm(model, x)))
    assert counts == {19}
