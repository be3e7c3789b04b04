"""Sums of per-batch statistics in one fixed order, whoever computes the parts.

Floating-point addition is not associative: the calibration statistics H = Σ_b X̃_bᵀX̃_b summed
batch after batch in one process and the same sum split over ranks (each rank sums its contiguous
shard, then the shards are added) differ in the last bits, and those bits can flip a rounding
decision of GPTQ / GPFQ.  Here every sum over batches 0..n-1 is the *dyadic tree* sum (pairwise
summation, Higham, "The accuracy of floating point summation", SIAM J. Sci. Comput. 14, 1993):
batch b is leaf (0, b); node (l, j) covers batches [j·2^l, (j+1)·2^l) and is node (l-1, 2j) +
node (l-1, 2j+1); a node whose range starts at or past n is absent, and a node with an absent
right child is its left child.  A node's value therefore does not depend on who computed it, and
the total over [0, n) is the same from one process streaming all batches as from N ranks each
streaming a contiguous shard and exchanging their largest complete nodes (``cover``).

Streaming keeps at most ⌈log2(batches)⌉ + 1 nodes (a binary counter); pairwise sums are also
more accurate than the running sum they replace.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Parts = list[torch.Tensor]  # one node's value: the same list of tensors at every node
Key = tuple[int, int]  # (level l, index j): batches [j·2^l, (j+1)·2^l)


def _add(a: Parts, b: Parts) -> Parts:
    return [x + y for x, y in zip(a, b)]


def cover(start: int, stop: int) -> list[Key]:
    """The largest dyadic nodes inside batches [start, stop), in batch order: what a stream over
    that range holds at its end (the same nodes ``DyadicSum`` keeps)."""
    keys: list[Key] = []
    b = start
    while b < stop:
        level = 0
        while b % (2 << level) == 0 and b + (2 << level) <= stop:
            level += 1
        keys.append((level, b >> level))
        b += 1 << level
    return keys


@dataclass
class DyadicSum:
    """A stream of per-batch parts (``push`` batch b, b+1, ... in order) kept as dyadic nodes."""

    nodes: dict[Key, Parts] = field(default_factory=dict)  # the complete nodes so far, merged greedily
    stack: list[Key] = field(default_factory=list)  # their keys, in batch order
    next_batch: int | None = None  # the batch the next push must be (contiguous stream)

    def push(self, batch: int, parts: Parts) -> None:
        """Add batch ``batch``'s parts; merge with left siblings while the new node completes one."""
        if self.next_batch is not None and batch != self.next_batch:
            raise ValueError(f"batches must be pushed in order: expected batch {self.next_batch}, got {batch}")
        self.next_batch = batch + 1
        key, value = (0, batch), parts
        while self.stack and key[1] % 2 == 1 and self.stack[-1] == (key[0], key[1] - 1):
            left = self.stack.pop()
            value = _add(self.nodes.pop(left), value)
            key = (key[0] + 1, key[1] // 2)
        self.stack.append(key)
        self.nodes[key] = value


def total(nodes: dict[Key, Parts]) -> Parts:
    """The dyadic tree sum over batches [0, n) from nodes that cover exactly that range (any mix of
    complete nodes: one stream's, or every rank's ``cover``)."""
    if not nodes:
        raise ValueError("no statistics to sum (no calibration batch)")
    n = max((j + 1) << lv for lv, j in nodes)
    return _node(nodes, n, max(0, (n - 1).bit_length()), 0)


def _node(nodes: dict[Key, Parts], n: int, level: int, j: int) -> Parts | None:
    """Node (level, j) of the tree over batches [0, n).  A plain function, not a closure that calls
    itself: such a closure is a reference cycle holding ``nodes`` (every layer's statistics)
    until the garbage collector runs, which let the out-of-core walk's memory grow block after block."""
    if (level, j) in nodes:
        return nodes[(level, j)]
    if j << level >= n:
        return None
    if level == 0:
        raise ValueError(f"the statistics of calibration batch {j} are missing")
    left, right = _node(nodes, n, level - 1, 2 * j), _node(nodes, n, level - 1, 2 * j + 1)
    return left if right is None else _add(left, right)
