import copy

import pytest
import torch
from torch import nn

from specquant.algorithms import GPFQConfig, ModuleSettings, RTNConfig
from specquant.engine.apply import quantize
from specquant.mixed import allocate, measure_sensitivity


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def data(n=96, seed=1):
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def test_only_the_measured_layer_is_quantized():
    model = mlp()
    with torch.no_grad():  # layer "2" on a 2-bit narrow grid already: min-max RTN leaves it exact
        w = model[2].weight
        model[2].weight.copy_(torch.sign(w).round() * w.abs().amax(1, keepdim=True) * (w.abs() > 0.1))
    before = copy.deepcopy(model.state_dict())
    rep = measure_sensitivity(model, data(), (2, 3, 8), RTNConfig(scale_rule="minmax"))
    assert rep.names == ["0", "2", "4"]
    costs = {s.name: s.costs for s in rep.layers}
    assert all(c == pytest.approx(0.0, abs=1e-12) for c in costs["2"].values())
    assert costs["0"][2] > costs["0"][8] > 0
    assert costs["4"][2] > costs["4"][8] > 0
    for k, v in model.state_dict().items():  # the model given is not changed
        assert torch.equal(v, before[k])


def test_loss_metric_with_and_without_labels():
    model, x = mlp(), data()
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    rep = measure_sensitivity(model, x, (2, 8), metric="loss", labels=y)
    assert rep.labels == "given" and rep.baseline > 0
    rep2 = measure_sensitivity(model, x, (2, 8), metric="loss")
    assert rep2.labels == "float-predictions"
    for s in rep2.layers:  # 8 bits barely moves the loss; 2 bits moves it more (either way:
        assert abs(s.costs[8]) < abs(s.costs[2])  # the loss can drop on pseudo-labels)
    with pytest.raises(ValueError, match="labels"):
        measure_sensitivity(model, x, (2,), metric="loss", labels=y[:5])
    with pytest.raises(ValueError, match="unknown sensitivity metric"):
        measure_sensitivity(model, x, (2,), metric="kl")


def test_data_driven_method_and_allocation_round_trip():
    model, x = mlp(), data()
    rep = measure_sensitivity(model, x, (2, 4), GPFQConfig(), layers=["2"])
    assert rep.method == "gpfq" and rep.names == ["2"]
    assert rep.layers[0].costs[2] > rep.layers[0].costs[4] > 0

    alloc = allocate(model, x, 3.0, "sensitivity", candidates=(2, 3, 4, 6, 8))
    assert alloc.avg_bits <= 3.0
    assert alloc.sensitivity is not None and alloc.solver in ("dp", "milp")
    assert alloc.predicted_cost == pytest.approx(
        sum(alloc.sensitivity.layers[i].costs[a.bits] for i, a in enumerate(alloc.layers)))
    # reusing the report for another budget measures nothing again
    alloc2 = allocate(model, x, 4.0, "sensitivity", sensitivity=alloc.sensitivity)
    assert alloc2.predicted_cost <= alloc.predicted_cost
    q = copy.deepcopy(model)
    report = quantize(q, alloc.apply(GPFQConfig()), x, progress=False)
    assert [r.bits for r in report.layers] == [a.bits for a in alloc.layers]
    assert report.avg_bits == pytest.approx(alloc.avg_bits)


def test_allocate_measures_sensitivities_on_the_first_samples_only():
    model, x = mlp(), data(n=96)
    y = torch.randint(0, 5, (96,), generator=torch.Generator().manual_seed(3))
    alloc = allocate(model, x, 3.0, "sensitivity", metric="loss", labels=y, sensitivity_samples=40)
    assert alloc.sensitivity.n_samples == 40 and alloc.sensitivity.labels == "given"
    with pytest.raises(ValueError, match="sensitivity_samples"):
        allocate(model, x, 3.0, "sensitivity", sensitivity_samples=0)


def test_row_costs_split_the_layer_cost_by_each_rows_output_error():
    model, x = mlp(), data()
    rep = measure_sensitivity(model, x, (2, 4), RTNConfig())
    for s in rep.layers:
        w = dict(model.named_modules())[s.name].weight
        assert s.row_len == w.shape[1]
        for b in (2, 4):
            rc = s.row_costs[b]
            assert len(rc) == w.shape[0] and min(rc) >= 0
            assert sum(rc) == pytest.approx(s.costs[b], rel=1e-9)
    # the split follows ‖X(w_i − ŵ_i)‖² on the layer's float inputs: check the first layer by hand
    q = copy.deepcopy(model)
    quantize(q, RTNConfig(bits=2, modules={"2": ModuleSettings(skip=True), "4": ModuleSettings(skip=True)}), x,
             progress=False)
    d = model[0].weight - q[0].weight
    e = (x @ d.t()).double().pow(2).sum(0)
    first = rep.layers[0]
    expect = (first.costs[2] * e / e.sum()).tolist()
    assert first.row_costs[2] == pytest.approx(expect, rel=1e-6)
    assert measure_sensitivity(model, x, (2,), row_costs=False).layers[0].row_costs is None


def test_channel_allocation_fits_the_budget_and_runs_in_the_engine():
    model, x = mlp(), data()
    sens = measure_sensitivity(model, x, (2, 3, 4, 8), GPFQConfig())
    per_layer = allocate(model, x, 2.5, "sensitivity", (2, 3, 4, 8), GPFQConfig(), sensitivity=sens)
    per_row = allocate(model, x, 2.5, "sensitivity", (2, 3, 4, 8), GPFQConfig(), sensitivity=sens,
                       granularity="channel")
    assert per_row.granularity == "channel" and per_row.avg_bits <= 2.5
    # per-row choice contains every per-layer choice: its predicted cost is never higher
    assert per_row.predicted_cost <= per_layer.predicted_cost * (1 + 1e-9)
    mixed_rows = {a.name: a.row_bits for a in per_row.layers if a.row_bits is not None}
    assert mixed_rows, "expected some layer to mix widths at 2.5 bits"
    assert per_row.modules == {a.name: ModuleSettings(bits=a.bits, row_bits=a.row_bits) for a in per_row.layers}
    for a in per_row.layers:
        if a.row_bits is not None:
            assert a.bits == max(a.row_bits) and len(a.row_bits) == dict(model.named_modules())[a.name].out_features
    q = copy.deepcopy(model)
    report = quantize(q, per_row.apply(GPFQConfig()), x, progress=False)
    assert report.avg_bits == pytest.approx(per_row.avg_bits)
    for r in report.layers:
        assert r.row_bits == (list(mixed_rows[r.name]) if r.name in mixed_rows else None)
    text = per_row.format_table()
    assert "per channel" in text and "rows:" in text
    with pytest.raises(ValueError, match="granularity 'channel' needs policy 'sensitivity'"):
        allocate(model, x, 2.5, "spectral", granularity="channel")
    with pytest.raises(ValueError, match="no per-row costs"):
        allocate(model, x, 2.5, "sensitivity", (2, 4), sensitivity=measure_sensitivity(model, x, (2, 4),
                                                                                       row_costs=False),
                 granularity="channel")
    with pytest.raises(ValueError, match="unknown allocation granularity"):
        allocate(model, x, 2.5, granularity="block")
