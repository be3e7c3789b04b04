"""Per-class accuracy of a classifier and the disparity of its drop against a reference.

Disparity follows the primer's use of the word (../shared/seeds/002, "Layer-Selective
Protection": the ratio of the degradation of the worst-served group to the typical one), read
per class: with ``d_c`` = reference accuracy of class c − accuracy of class c (points),

    disparity = max_c d_c / mean_c d_c

1 means every class lost the same; larger means one class paid more than the average.  It is
undefined (None) when the mean drop is not positive (the model is as good as the reference on
average), since a ratio to a zero or negative mean says nothing.  Pure functions on tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy in percent of each class (num_classes,) float64 from predicted and true labels (n,).

    A class with no sample in ``labels`` is an error (its accuracy would be 0/0)."""
    if pred.shape != labels.shape or pred.dim() != 1:
        raise ValueError(f"pred and labels must be 1-D of one length, got {tuple(pred.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes).double()  # (C,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"class(es) {empty} have no sample in labels: their accuracy is undefined")
    hits = torch.bincount(labels[pred == labels], minlength=num_classes).double()  # (C,)
    return 100.0 * hits / counts


@dataclass(frozen=True)
class ClassDrop:
    """Per-class accuracy drop of a model against a reference (e.g. the float model)."""

    drops: tuple[float, ...]  # reference − model accuracy of each class, points
    mean_drop: float  # mean of ``drops`` (= the overall drop when classes are balanced)
    worst_drop: float  # largest class drop, points
    worst_class: int  # its class index
    disparity: float | None  # worst_drop / mean_drop; None when mean_drop <= 0

    def to_dict(self) -> dict:
        return {"per_class_drop": list(self.drops), "mean_drop": self.mean_drop, "worst_drop": self.worst_drop,
                "worst_class": self.worst_class, "disparity": self.disparity}


def class_drop(reference: torch.Tensor, model: torch.Tensor) -> ClassDrop:
    """The drop from per-class accuracies ``reference`` (C,) to ``model`` (C,) and its disparity."""
    if reference.shape != model.shape or reference.dim() != 1 or reference.numel() == 0:
        raise ValueError(f"per-class accuracies must be 1-D of one non-zero length, got {tuple(reference.shape)} "
                         f"and {tuple(model.shape)}")
    d = (reference.double() - model.double())  # (C,)
    mean = float(d.mean())
    worst = int(d.argmax())
    return ClassDrop(tuple(float(v) for v in d), mean, float(d[worst]), worst,
                     float(d[worst]) / mean if mean > 0 else None)


def bootstrap_disparity(ref_pred: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        reps: int = 200, seed: int = 0, level: float = 0.9) -> tuple[float, float] | None:
    """A percentile bootstrap interval (``level``, e.g. 0.9 → 5th and 95th percentiles) of the
    disparity of ``pred`` against ``ref_pred`` (both (n,) predictions on the same images, true
    ``labels`` (n,)): the test images are resampled with replacement within each class (seeded),
    both models scored on the same resample.  None when fewer than half the resamples have a
    positive mean drop.  The worst of several noisy class drops is biased upwards, so with a
    small mean drop the disparity is large from noise alone: the interval shows how much."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    gen = torch.Generator().manual_seed(seed)
    by_class = [(labels == c).nonzero().flatten() for c in range(num_classes)]  # indices per class
    hit_ref, hit = (ref_pred == labels).double(), (pred == labels).double()  # (n,)
    vals = []
    for _ in range(reps):
        d = torch.empty(num_classes, dtype=torch.float64)
        for c, idx in enumerate(by_class):
            pick = idx[torch.randint(0, idx.numel(), (idx.numel(),), generator=gen)]
            d[c] = 100.0 * (hit_ref[pick].mean() - hit[pick].mean())
        if float(d.mean()) > 0:
            vals.append(float(d.max() / d.mean()))
    if 2 * len(vals) < reps:
        return None
    v = torch.tensor(vals, dtype=torch.float64)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(v, q).tolist()
    return lo, hi
