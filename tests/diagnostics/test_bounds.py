"""The end-to-end output-error bound and the chain check (specquant.diagnostics.bounds)."""
import pytest
import torch
from torch import nn

from specquant.core.quantizer import quantize_tensor
from specquant.diagnostics.analyze import analyze
from specquant.diagnostics.bounds import chain_check, conv_overlap
from specquant.models.zoo import get_model


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Identity])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_end_to_end_bound_is_never_below_the_measurement_on_an_mlp(act, bits):
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Linear(20, 32), act(), nn.Linear(32, 24), act(), nn.Linear(24, 6)).eval()
    x = 3.0 * torch.randn(200, 20, generator=torch.Generator().manual_seed(7))
    rep = analyze(model, x, bits=(bits,), bound_bits=bits)
    e = rep.end_to_end
    assert e.kind == "chain" and e.reason == ""
    assert e.holds and e.worst_ratio <= 1.0
    assert e.bound_mean >= e.measured_mean > 0 and e.bound_max >= e.measured_max
    assert e.apriori_mean >= e.quant_path_mean * (1 - 1e-9)  # the a-priori form is looser
    assert [t.name for t in e.terms] == ["0", "2", "4"]


def test_bound_is_tight_for_one_linear_layer():
    # f(x) = Wx + b: ‖(W − Ŵ)x‖ ≤ ε‖x‖ with equality at the top right singular vector of W − Ŵ
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).eval()
    rep0 = analyze(lin, torch.randn(4, 16), bound_bits=3)
    E = (lin.weight - quantize_tensor(lin.weight.detach(), 3, clipping="minmax").dequantize()).double()
    v = torch.linalg.svd(E).Vh[0].float()
    rep = analyze(lin, torch.stack([v, 2 * v]), bound_bits=3)
    e = rep.end_to_end
    assert e.terms[0].eps == pytest.approx(rep0.end_to_end.terms[0].eps)
    assert e.worst_ratio == pytest.approx(1.0, rel=1e-5)
    assert e.holds or e.worst_ratio == pytest.approx(1.0, rel=1e-9)


def test_conv_chain_bound_holds_and_residual_net_is_heuristic():
    torch.manual_seed(1)
    convnet = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    e = analyze(convnet, x, bits=(2,), bound_bits=2).end_to_end
    assert e.kind == "chain" and e.holds
    assert [t.conv_factor for t in e.terms] == [9, 4, 1]

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(x + self.a(x)))

    e = analyze(Res().eval(), torch.randn(10, 8), bits=(4,)).end_to_end
    assert e.kind == "heuristic" and "'b'" in e.reason


def test_conv_overlap_factor():
    assert conv_overlap(nn.Linear(3, 4)) == 1
    assert conv_overlap(nn.Conv2d(2, 2, 3)) == 9
    assert conv_overlap(nn.Conv2d(2, 2, 3, stride=2)) == 4
    assert conv_overlap(nn.Conv2d(2, 2, 3, stride=2, dilation=2)) == 9
    assert conv_overlap(nn.Conv1d(2, 2, 5, stride=3)) == 2


def test_chain_check_rejects_non_lipschitz_glue():
    ok, _ = chain_check(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), torch.randn(3, 4))
    assert not ok
    ok, why = chain_check(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)), torch.randn(3, 4))
    assert ok, why


def test_bound_holds_on_the_trained_digits_mlp():
    model, entry = get_model("digits-mlp")
    rep = analyze(model, entry.calib(256, 0), bits=(2, 4, 8), bound_bits=2)
    e = rep.end_to_end
    assert e.kind == "chain" and e.n_samples == 256
    assert e.holds and 0 < e.measured_max <= e.bound_max
    assert [la.name for la in rep.layers] == ["fc1", "fc2", "fc3"]
