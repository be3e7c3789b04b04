"""analyze(model): per-layer spectra and statistics, RTN error against the weight bounds, BN folding."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from specquant.core.clipping import aciq_alpha_ratio
from specquant.diagnostics.analyze import analyze


def with_singular_values(out, inp, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64))
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.T).float()


def known_mlp(act=nn.ReLU):
    s1 = [4.0, 2.0, 1.0, 0.5, 0.25, 0.125]  # κ = 32, stable rank = Σs²/16
    s2 = [3.0, 1.0, 1.0, 1.0]  # κ = 3
    l1, l2 = nn.Linear(10, 6), nn.Linear(6, 4)
    with torch.no_grad():
        l1.weight.copy_(with_singular_values(6, 10, s1, 0))
        l2.weight.copy_(with_singular_values(4, 6, s2, 1))
    return nn.Sequential(l1, act(), l2).eval(), s1, s2


def test_known_singular_values():
    model, s1, s2 = known_mlp()
    rep = analyze(model, bits=(2, 4))
    a, b = rep.layers
    assert (a.name, a.matrix_shape, a.params) == ("0", [6, 10], 60)
    assert a.op_norm == pytest.approx(4.0, rel=1e-5)
    assert a.sigma_min == pytest.approx(0.125, rel=1e-4)
    assert a.kappa == pytest.approx(32.0, rel=1e-4)
    assert a.lock_bits in (5, 6)  # ⌈log₂ 32⌉ = 5 up to float32 rounding of the weights
    assert a.stable_rank == pytest.approx(sum(x * x for x in s1) / 16, rel=1e-4)
    assert a.effective_rank == 6
    assert b.kappa == pytest.approx(3.0, rel=1e-4) and b.lock_bits == 2
    for la in rep.layers:
        for e in la.rtn:
            assert e.op_error <= e.fro_error + 1e-12  # ‖E‖_op ≤ ‖E‖_F
            assert e.op_bound == pytest.approx(la.op_norm / 2**e.bits, rel=1e-6)
            assert e.op_ratio == pytest.approx(e.op_error / e.op_bound)
            assert e.fro_ratio == pytest.approx(e.fro_error / e.fro_bound)
        assert la.error(4).fro_error < la.error(2).fro_error
    assert rep.end_to_end is None  # no calibration data


def test_bn_folded_on_a_copy_and_report_outputs():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    model[1].running_var.fill_(4.0)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    rep = analyze(model, torch.randn(16, 3, 6, 6), bits=(3, 4))
    assert [(f.bn, f.into) for f in rep.folded_bn] == [("1", "0")]
    assert rep.end_to_end.kind == "chain" and rep.end_to_end.holds  # BN became Identity
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert rep.layer("0").op_norm == pytest.approx(
        torch.linalg.matrix_norm(before["0.weight"].reshape(4, -1).double() / 2.0, ord=2).item(), rel=1e-4)
    rows = rep.to_rows()
    assert len(rows) == 2 and all(not isinstance(v, (list, dict)) for r in rows for v in r.values())
    assert {"kappa", "lock_bits", "rtn_op_b3", "op_ratio_b4", "fro_bound_b4", "e2e_eps"} <= set(rows[0])
    json.dumps(rep.to_dict(), allow_nan=False)
    text = rep.format_table()
    assert "kappa" in text and "a true bound" in text


def test_aciq_model_follows_kurtosis():
    g = torch.Generator().manual_seed(0)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))
    gauss = torch.randn(64, 256, generator=g)
    for w, dist in ((lap, "laplace"), (gauss, "gauss")):
        lin = nn.Linear(256, 64)
        with torch.no_grad():
            lin.weight.copy_(w)
        la = analyze(lin, bits=(4,)).layers[0]
        assert la.aciq_dist == dist
        x = w.double().flatten()
        spread = (x - x.mean()).abs().mean() if dist == "laplace" else x.std(correction=0)
        assert la.aciq_alpha == pytest.approx(aciq_alpha_ratio(4, dist) * float(spread), rel=1e-6)
        assert 0 < la.aciq_clipped_share < 0.05


def test_singular_layer_and_bad_arguments():
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])))
    la = analyze(lin, bits=(4,)).layers[0]
    assert math.isinf(la.kappa) and la.lock_bits is None
    assert analyze(lin, bits=(4,)).to_dict()["layers"][0]["kappa"] is None
    with pytest.raises(ValueError, match="1..8"):
        analyze(lin, bits=(0, 4))
    with pytest.raises(ValueError, match="no quantizable layers"):
        analyze(nn.ReLU())
