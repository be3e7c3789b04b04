"""What a report says first: one definition of bits per weight, the headline of a run (score
change against float with its test-set noise, size against float, time) and, for sweeps, the
Pareto-optimal rows and one recommended row with the rule that chose it.

Pure functions of the figures a command measured (the storage breakdown of the saved file, the
scores); they compute nothing about models.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

BPW_DEFINITION = ("bits per weight = (file bytes − bytes of the layers kept in float) × 8 / weights of the quantized "
                  "layers = code bits + scale bits (scales and zero points) + file overhead (headers)")

ACCURACY_TOLERANCE = 0.5  # points: "within 0.5 points of float"
PERPLEXITY_TOLERANCE = 0.05  # relative: "within 5 % of float perplexity"


@dataclass(frozen=True)
class BitsPerWeight:
    """The one bits-per-weight figure of a saved model, split by what the bits hold."""

    code: float  # packed codes per quantized weight
    scale: float  # scales and zero points (and per-row widths) per quantized weight
    overhead: float  # file headers and alignment per quantized weight

    @property
    def total(self) -> float:
        """code + scale + overhead: the file's bits per weight (:data:`BPW_DEFINITION`)."""
        return self.code + self.scale + self.overhead

    @classmethod
    def from_storage(cls, storage: Mapping) -> BitsPerWeight | None:
        """From ``specquant.io.storage_breakdown`` of the saved file; None without quantized weights."""
        n = storage.get("quantized_weights")
        if not n:
            return None
        overhead = storage["file_bytes"] - storage["float_bytes"] - storage["codes_bytes"] - storage["scale_bytes"] \
            - storage["zero_point_bytes"]
        return cls(code=storage["codes_bytes"] * 8 / n,
                   scale=(storage["scale_bytes"] + storage["zero_point_bytes"]) * 8 / n,
                   overhead=overhead * 8 / n)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def text(self) -> str:
        return (f"{self.total:.3f} bits/weight = {self.code:.3f} code + {self.scale:.3f} scale + "
                f"{self.overhead:.3f} file overhead")


def size_vs_float(storage: Mapping) -> float | None:
    """How many times smaller the file is than the same model in float32 (every weight 4 bytes,
    the layers kept in float as stored)."""
    n = storage.get("quantized_weights")
    if not n or not storage.get("file_bytes"):
        return None
    return (4 * n + storage["float_bytes"]) / storage["file_bytes"]


def budget_note(budget: float, code_bits: float, bpw: BitsPerWeight) -> str:
    """One line on why a mixed-precision budget and the file's bits per weight differ."""
    return (f"The budget of {budget:g} bits counts code bits only (achieved {code_bits:.3f}); the file stores "
            f"{bpw.total:.3f} bits per weight because it adds {bpw.scale:.3f} bits of scales, zero points (and "
            f"per-row widths) and {bpw.overhead:.3f} bits of headers per weight.")


def binomial_se(accuracy_percent: float, n: int) -> float:
    """Standard error of a top-1 accuracy measured on ``n`` test samples, in points:
    100·sqrt(p(1 − p)/n)."""
    if n <= 0:
        return float("nan")
    p = min(max(accuracy_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class Headline:
    """The first line of a run's report."""

    score: str  # "accuracy" (top-1 %), "perplexity" or the user's metric name
    float_value: float
    value: float
    n_test: int | None  # test samples (accuracy) or predicted tokens (perplexity)
    size_ratio: float | None  # float32 size / file size
    seconds: float | None  # quantization wall time

    @property
    def change(self) -> float:
        return self.value - self.float_value

    @property
    def noise(self) -> float | None:
        """Binomial standard error of the accuracy (points), None for other scores."""
        return binomial_se(self.value, self.n_test) if self.score == "accuracy" and self.n_test else None

    def to_dict(self) -> dict:
        """Its fields with ``change`` and ``noise`` (no text: the time in it changes run to run)."""
        return {**asdict(self), "change": self.change, "noise": self.noise}

    @classmethod
    def from_dict(cls, d: Mapping) -> Headline:
        return cls(**{k: d[k] for k in ("score", "float_value", "value", "n_test", "size_ratio", "seconds")})

    def text(self) -> str:
        if self.score == "accuracy":
            first = (f"accuracy {self.value:.2f} % ({self.change:+.2f} points vs float {self.float_value:.2f} %, "
                     f"± {self.noise:.2f} binomial s.e. on {self.n_test} test samples)")
        elif self.score == "perplexity":
            rel = 100.0 * self.change / self.float_value if self.float_value else float("nan")
            first = f"perplexity {self.value:.3f} ({self.change:+.3f}, {rel:+.1f} % vs float {self.float_value:.3f})"
        else:
            first = f"{self.score} {self.value:.6g} ({self.change:+.4g} vs float {self.float_value:.6g})"
        parts = [first]
        if self.size_ratio:
            parts.append(f"{self.size_ratio:.1f}× smaller than float32")
        if self.seconds is not None:
            parts.append(f"quantized in {self.seconds:.1f} s")
        return "; ".join(parts)


def pareto_front(sizes: Sequence[float], scores: Sequence[float], higher_is_better: bool = True) -> list[bool]:
    """For each row, whether no other row is at least as small and at least as good, and strictly
    one of the two (smaller size, better score)."""
    sign = 1.0 if higher_is_better else -1.0
    out = []
    for i, (s, q) in enumerate(zip(sizes, scores)):
        dominated = any(
            j != i and s2 <= s and sign * q2 >= sign * q and (s2 < s or sign * q2 > sign * q)
            for j, (s2, q2) in enumerate(zip(sizes, scores))
        )
        out.append(not dominated)
    return out


@dataclass(frozen=True)
class Recommendation:
    """The recommended row of a sweep and the rule that chose it."""

    index: int | None  # the row, or None when no row meets the rule
    rule: str  # in words

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(sizes: Sequence[float], scores: Sequence[float], float_score: float, *,
              perplexity: bool = False) -> Recommendation:
    """The smallest row whose score is within the tolerance of float (ties: the better score);
    without one, the best-scoring row, said so."""
    if perplexity:
        rule = f"smallest model within {100 * PERPLEXITY_TOLERANCE:g} % of float perplexity"
        ok = [q <= float_score * (1 + PERPLEXITY_TOLERANCE) for q in scores]
        key = [-q for q in scores]
    else:
        rule = f"smallest model within {ACCURACY_TOLERANCE:g} points of float accuracy"
        ok = [q >= float_score - ACCURACY_TOLERANCE for q in scores]
        key = list(scores)
    cands = [i for i, good in enumerate(ok) if good]
    if cands:
        return Recommendation(min(cands, key=lambda i: (sizes[i], -key[i])), rule)
    if not scores:
        return Recommendation(None, rule)
    best = max(range(len(scores)), key=lambda i: (key[i], -sizes[i]))
    return Recommendation(best, f"no model is within the tolerance ({rule}); the best-scoring one")


def mark_sweep(rows: list[dict], float_score: float, *, size_key: str = "bits_per_weight",
               score_key: str = "accuracy", perplexity: bool = False) -> Recommendation:
    """Add ``pareto`` (bool), ``recommended`` (bool), ``change`` and (for accuracy) ``noise`` to
    each row in place; return the recommendation."""
    sizes = [float(r[size_key]) for r in rows]
    scores = [float(r[score_key]) for r in rows]
    front = pareto_front(sizes, scores, higher_is_better=not perplexity)
    rec = recommend(sizes, scores, float_score, perplexity=perplexity)
    for i, r in enumerate(rows):
        r["change"] = scores[i] - float_score
        if not perplexity and r.get("n_test"):
            r["noise"] = binomial_se(scores[i], int(r["n_test"]))
        r["pareto"] = front[i]
        r["recommended"] = rec.index == i
    return rec
