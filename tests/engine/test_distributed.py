"""Data-parallel calibration (engine/distributed.py): two gloo ranks on 127.0.0.1 give the very
codes, scales, weights and report numbers of one process, for deterministic methods and for SPFQ
(its random choices run once, on the layer's owner); what does not split is refused with one line."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import specquant as sq
from specquant.engine.distributed import check_distributed, shard_range
from specquant.engine.treesum import cover

pytestmark = pytest.mark.usefixtures("one_thread")

# The cases, built the same way in the test process and in each rank (the worker imports this text).
CASES = textwrap.dedent('''
    import torch
    import transformers
    import specquant as sq

    def mlp():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 8))
        return m.eval(), torch.randn(70, 16, generator=torch.Generator().manual_seed(1)), 16  # 5 batches

    def llama():
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        ids = torch.randint(0, 64, (6, 20), generator=torch.Generator().manual_seed(3))
        return transformers.LlamaForCausalLM(cfg).eval(), ids, 2  # 3 batches

    CONFIGS = {"rtn": lambda: sq.RTNConfig(bits=3),
               "gptq": lambda: sq.GPTQConfig(bits=3, granularity="group:16", symmetric=False),
               "gpfq": lambda: sq.GPFQConfig(bits=3, bias_correction=True),
               "qronos": lambda: sq.QronosConfig(bits=3),
               "spfq": lambda: sq.SPFQConfig(bits=2, seed=5)}
    RUNS = [("mlp", m) for m in CONFIGS] + [("llama", m) for m in ("rtn", "gptq", "gpfq")]

    def run(model_name, method, dist=None):
        model, x, bs = {"mlp": mlp, "llama": llama}[model_name]()
        report = sq.quantize(model, CONFIGS[method](), calib=x, batch_size=bs, progress=False, dist=dist)
        out = {f"{n}/{k}": getattr(m.qweight, k) for n, m in model.named_modules() if hasattr(m, "qweight")
               for k in ("codes", "scale", "zero_point")}
        out.update({f"state/{k}": v for k, v in model.state_dict().items()})
        out["rel_output_error"] = torch.tensor([r.rel_output_error for r in report.layers], dtype=torch.float64)
        out["n_calib"] = torch.tensor(report.n_calib)
        return out
''')

WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as tdist
    from specquant.engine.distributed import Dist
    exec(open(sys.argv[1]).read())
    rank, world, port, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dist = Dist.current()
    results = {f"{m}:{meth}": run(m, meth, dist) for m, meth in RUNS}
    results["bytes"] = {"received": torch.tensor(dist.received_bytes)}
    torch.save(results, out)
    tdist.destroy_process_group()
''')


def _cases():
    scope: dict = {}
    exec(CASES, scope)  # noqa: S102 - the test's own text, shared with the worker
    return scope


def _free_port():
    from specquant.cli.distributed import free_port
    return free_port()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case run by two gloo ranks (fresh processes); each rank's results."""
    tmp = tmp_path_factory.mktemp("ranks")
    (tmp / "cases.py").write_text(CASES)
    (tmp / "worker.py").write_text(WORKER)
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [subprocess.Popen([sys.executable, str(tmp / "worker.py"), str(tmp / "cases.py"), str(r), "2", port,
                               str(tmp / f"rank{r}.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", [f"{m}:{meth}" for m, meth in _cases()["RUNS"]])
def test_two_ranks_equal_one_process(two_ranks, case):
    """Same codes, scales, zero points, weights (bias correction included) and output errors on
    both ranks as in one process: the statistics are summed in one order, the algorithm runs once."""
    one = _cases()["run"](*case.split(":"))
    for rank, res in enumerate(two_ranks):
        got = res[case]
        assert got.keys() == one.keys()
        for k, v in one.items():
            assert torch.equal(got[k], v), f"rank {rank}, {case}: {k} differs"


def test_communicated_bytes_are_counted(two_ranks):
    """Each rank receives the other's statistics nodes and the results of the layers it does not own."""
    assert all(int(r["bytes"]["received"]) > 0 for r in two_ranks)


def test_shards_are_contiguous_and_cover_the_batches():
    for n in (2, 5, 9):
        for world in range(1, n + 1):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
            assert all(cover(a, b) for a, b in ranges)


@pytest.mark.parametrize("config, fraction, batches, match", [
    (sq.GPTQConfig(bits=4, act_bits=8), 1.0, 4, "activation quantization"),
    (sq.GPTQConfig(bits=4, awq=True), 1.0, 4, "AWQ searches"),
    (sq.GPFQConfig(bits=4), 0.5, 4, "patch_fraction=0.5"),
    (sq.GPFQConfig(bits=4), 1.0, 1, "2 ranks need at least 2 calibration batches, got 1"),
])
def test_what_does_not_split_is_refused(config, fraction, batches, match):
    check_distributed(config, fraction, batches, 1)  # one process: everything goes
    with pytest.raises(ValueError, match=match):
        check_distributed(config, fraction, batches, 2)


def test_layer_results_travel_without_pickle():
    """A QuantizedWeight (and the (result, error) pair) survives encode/decode exactly; a class outside
    the allow-list is refused on both sides (no pickle: a peer cannot make a rank run code)."""
    from specquant.core.grid import Granularity
    from specquant.core.layouts import RowsLayout
    from specquant.core.quantizer import quantize_tensor
    from specquant.engine.distributed import decode_result, encode_result, tensor_bytes

    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    qw = quantize_tensor(W, bits=3, granularity=Granularity("group", group_size=8))
    per_row = quantize_tensor(W, bits=3, granularity="channel")
    rows = dataclasses.replace(per_row, layout=RowsLayout([3, 3, 2, 3, 3, 3], per_row.codes.shape))
    for obj in ((qw, None), (rows, None), (None, "layer 'x': one line")):
        meta, tensors = encode_result(obj)
        back = decode_result(json.loads(json.dumps(meta)), tensor_bytes(tensors))
        assert back[1] == obj[1]
        if obj[0] is not None:
            got, want = back[0], obj[0]
            assert type(got) is type(want) and got.spec == want.spec and got.granularity == want.granularity
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
            assert torch.equal(got.dequantize(), want.dequantize())
            assert type(got.layout) is type(want.layout) and vars(got.layout).keys() == vars(want.layout).keys()
    with pytest.raises(ValueError, match="do not exchange"):
        encode_result((object(), None))
    bad = {"object": "os.system", "attrs": {}}
    with pytest.raises(ValueError, match="do not exchange"):
        decode_result(bad, torch.empty(0, dtype=torch.uint8))


def test_exchanging_a_result_leaves_no_reference_cycle(collector_off):
    """The encoder's and decoder's self-calling closures are unbound when they finish: with the
    garbage collector off, the sent tensors and the received bytes are freed as soon as the caller
    drops them (else each layer's result waited for a collection)."""
    import weakref

    from specquant.core.quantizer import quantize_tensor
    from specquant.engine.distributed import decode_result, encode_result, tensor_bytes

    qw = quantize_tensor(torch.randn(6, 32, generator=torch.Generator().manual_seed(0)), bits=3,
                         granularity="channel")
    meta, tensors = encode_result((qw, None))
    sent = [weakref.ref(t) for t in tensors]
    blob = tensor_bytes(tensors)
    received = weakref.ref(blob)
    back = decode_result(json.loads(json.dumps(meta)), blob)
    assert torch.equal(back[0].codes, qw.codes)
    del meta, tensors, blob, back
    assert all(w() is None for w in sent) and received() is None
