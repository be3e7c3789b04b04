"""Fully connected classifiers and a small deterministic trainer."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1])``.

    No activation after the last layer (it returns logits). Layers are named ``fc1``,
    ``fc2``, ... so that reports read naturally.
    """

    def __init__(self, sizes: list[int] | tuple[int, ...], act: type[nn.Module] = nn.ReLU):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
        self.sizes = tuple(int(s) for s in sizes)
        layers: list[tuple[str, nn.Module]] = []
        for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(n_in, n_out)))
            if i < len(self.sizes) - 1:
                layers.append((f"act{i}", act()))
        for name, module in layers:
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, sizes[0])
        for module in self.children():
            x = module(x)
        return x  # (B, sizes[-1]) logits


def train_mlp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    lr_decay: bool = True,
    threads: int | None = 1,
) -> nn.Module:
    """Train ``model`` in place with cross-entropy; returns it in eval mode.

    Deterministic for a given seed on a given machine and thread count: the weights are
    re-initialised from ``torch.manual_seed(seed)`` (so the result does not depend on the RNG
    state at construction time) and the batches are drawn from a dedicated generator.
    ``optimizer`` is ``"adam"`` or ``"sgd"`` (momentum 0.9); ``lr_decay`` applies a cosine
    schedule over all steps.

    ``threads`` (default 1) sets torch's intra-op thread count for the duration of the call
    (restored afterwards): small-batch training gains little from more threads and slows down
    badly when the cores are shared, and one thread makes the result independent of the
    machine's thread count. ``None`` keeps the current setting.
    """
    if threads is None:
        return _train(model, x, y, epochs, lr, batch_size, seed, optimizer, weight_decay, lr_decay)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(model, x, y, epochs, lr, batch_size, seed, optimizer, weight_decay, lr_decay)
    finally:
        torch.set_num_threads(previous)


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: str,
    weight_decay: float,
    lr_decay: bool,
) -> nn.Module:
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"need as many labels as inputs (>0), got {x.shape[0]} inputs and {y.shape[0]} labels"
        )
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    n = x.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch) if lr_decay else None
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()
