"""The one summation order of the calibration statistics (engine/treesum.py): the dyadic tree sum
over batches is the same whether one stream adds every batch or several ranks add contiguous shards
and exchange their nodes; a plain running sum is not (which is why the order was fixed)."""
import pytest
import torch

from specquant.engine.distributed import shard_range
from specquant.engine.treesum import DyadicSum, cover, total


def _leaves(n, seed=0):
    """Per-batch contributions of wildly different magnitudes, as float64 (like H's entries)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-6, 6, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return [[(torch.randn(5, 5, generator=g, dtype=torch.float64) * s)] for s in scale]


def _stream(leaves, start, stop):
    s = DyadicSum()
    for b in range(start, stop):
        s.push(b, leaves[b])
    return s


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 31])
def test_sharded_sums_equal_one_stream_bit_for_bit(n):
    leaves = _leaves(n, seed=n)
    one = total(_stream(leaves, 0, n).nodes)[0]
    for world in range(1, n + 1):
        nodes = {}
        for r in range(world):
            part = _stream(leaves, *shard_range(n, r, world))
            assert list(part.nodes) == cover(*shard_range(n, r, world))  # what every rank can predict
            nodes.update(part.nodes)
        assert torch.equal(total(nodes)[0], one), (n, world)
    exact = sum(float(x[0][0, 0]) for x in leaves)  # same value up to rounding
    assert abs(float(one[0, 0]) - exact) <= 1e-9 * max(sum(abs(float(x[0][0, 0])) for x in leaves), 1.0)


def test_a_running_sum_depends_on_the_split():
    """The reason for the fixed order: summing shard totals differs from one running sum in the
    last bits for such data (some split shows it), the tree does not."""
    leaves = _leaves(16, seed=3)
    running = sum((x[0] for x in leaves), torch.zeros(5, 5, dtype=torch.float64))
    differs = False
    for cut in range(1, 16):
        a = sum((x[0] for x in leaves[:cut]), torch.zeros(5, 5, dtype=torch.float64))
        b = sum((x[0] for x in leaves[cut:]), torch.zeros(5, 5, dtype=torch.float64))
        differs = differs or not torch.equal(a + b, running)
    assert differs


def test_order_and_missing_batches_are_errors():
    s = DyadicSum()
    s.push(0, [torch.ones(1)])
    with pytest.raises(ValueError, match="expected batch 1, got 2"):
        s.push(2, [torch.ones(1)])
    with pytest.raises(ValueError, match="batch 1 are missing"):
        total({(0, 0): [torch.ones(1)], (0, 2): [torch.ones(1)]})
    with pytest.raises(ValueError, match="no calibration batch"):
        total({})


def test_the_sum_leaves_no_reference_cycle_holding_the_statistics(collector_off):
    """With the garbage collector off, the parts are freed as soon as the caller lets go of them:
    a self-calling closure kept every layer's statistics alive until a collection (the out-of-core
    walk grew by one block's statistics per block)."""
    import weakref

    leaves = _leaves(5, seed=4)
    s = DyadicSum()
    for b, parts in enumerate(leaves):
        s.push(b, parts)
    watched = [weakref.ref(t) for parts in s.nodes.values() for t in parts]
    out = total(s.nodes)
    assert out[0].shape == leaves[0][0].shape
    del s, out, leaves, parts
    assert all(w() is None for w in watched)
