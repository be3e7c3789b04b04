"""Static activation quantizers: one scale and zero point per tensor, calibrated on samples.

A quantized layer may quantize its *input*: x̂ = S·(clamp(round(x/S) + Z, 0, 2^b − 1) − Z) on the
asymmetric b-bit grid of :class:`specquant.core.grid.GridSpec` (codes 0..2^b − 1, an integer
zero point Z, the range always containing 0, so zero padding stays exactly 0).  The range is
chosen once, on calibration inputs, by one of the calibrators of :mod:`specquant.core.clipping`
(post-training quantization of activations, Banner et al. 2019, "Post training 4-bit
quantization of convolutional networks for rapid-deployment", for ACIQ; Migacz 2017, TensorRT,
for KL; Jacob et al. 2018, "Quantization and training of neural networks for efficient
integer-arithmetic-only inference", for the asymmetric uint8 scheme).

``grid="fp8-e4m3"`` / ``"fp8-e5m2"`` makes it an FP8 quantizer instead: x̂ = S·fp8(x/S), the nearest
value of the 8-bit float format (ties to even, saturated at ±max; :func:`specquant.core.grid.fp8_round`),
one per-tensor scale S = α / max with α the calibrated clipping value (symmetric: α = max(|lo|, |hi|)
of the calibrator's range; ``mse`` searches α on the FP8 grid itself), zero point 0.

Everything here is pure: the engine draws a bounded, seeded sample of a layer's inputs
(:func:`sample_values`) and calls :func:`calibrate_activation`; the quantized model (the
engine's fake-quant model and the packed layers of ``specquant.nn``) applies
:meth:`ActQuantizer.fake_quantize`, the same float operations in both, so the two agree bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specquant.core.clipping import CLIPPING_METHODS, calibrate
from specquant.core.grid import FP8_FORMATS, GridSpec, check_bits, fp8_codes, fp8_round
from specquant.core.intmatmul import quantize_activations_dynamic

ACT_CALIBRATORS = ("mse", "minmax", "percentile", "kl", "aciq", "aciq-gauss", "aciq-laplace")
ACIQ_DEFAULT = "aciq-laplace"  # "aciq" means ACIQ's Laplace prior (Banner et al.'s model for activations)
ACT_GRIDS = ("int", "fp8-e4m3", "fp8-e5m2")  # integer (asymmetric uniform) or an 8-bit float grid
ACT_SAMPLE = 1 << 18  # values drawn per layer for calibration (memory and time stay bounded)
ACT_GRANULARITIES = ("tensor", "token")  # one static range per tensor, or one range per token (row) at run time


def check_act_calibrator(name: str) -> str:
    """The core calibrator behind ``name`` (``"aciq"`` is ``"aciq-laplace"``); a one-line error otherwise."""
    if name not in ACT_CALIBRATORS:
        raise ValueError(f"unknown activation calibrator {name!r}; allowed: {', '.join(ACT_CALIBRATORS)}")
    return ACIQ_DEFAULT if name == "aciq" else name


def check_act_grid(grid: str, bits: int | None = None) -> str:
    """``grid`` if it is one of ``ACT_GRIDS`` (an FP8 one only with 8 bits); a one-line error otherwise."""
    if grid not in ACT_GRIDS:
        raise ValueError(f"unknown activation grid {grid!r}; allowed: {', '.join(ACT_GRIDS)}")
    if grid != "int" and bits is not None and bits != 8:
        raise ValueError(f"an {grid} activation grid has 8 bits, got activation bits {bits}")
    return grid


@dataclass(frozen=True)
class ActQuantizer:
    """A per-tensor asymmetric activation quantizer: x ≈ scale·(q − zero_point), q in 0..2^bits − 1."""

    bits: int  # code width, 1..8
    scale: float  # step S > 0, a float32 value (stored exactly in JSON)
    zero_point: int  # integer Z in 0..2^bits − 1 (the code of 0.0)
    calibrator: str = "mse"  # the core calibrator that chose the range (informational)
    grid: str = "int"  # "int" (the asymmetric integer grid) or "fp8-e4m3" / "fp8-e5m2" (S·fp8(x/S), Z = 0)

    def __post_init__(self) -> None:
        check_bits(self.bits, "activation bits")
        check_act_grid(self.grid, self.bits)
        if self.grid != "int" and self.zero_point != 0:
            raise ValueError(f"an {self.grid} activation quantizer has zero point 0, got {self.zero_point!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"activation scale must be a number, got {self.scale!r}")
        if not (math.isfinite(self.scale) and self.scale > 0) or float(torch.tensor(self.scale).item()) != self.scale:
            raise ValueError(f"activation scale must be a finite float32 value > 0, got {self.scale!r}")
        if isinstance(self.zero_point, bool) or not isinstance(self.zero_point, int) \
                or not 0 <= self.zero_point <= self.qmax:
            raise ValueError(f"activation zero point must be an integer in 0..{self.qmax}, got {self.zero_point!r}")

    granularity = "tensor"  # one static range for the whole tensor (class attribute, not a field)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def spec(self) -> GridSpec:
        if self.grid != "int":
            return GridSpec(8, self.grid)
        return GridSpec.default(self.bits, symmetric=False)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` (same shape, uint8): clamp(round(x/S) + Z, 0, qmax) (FP8: the bit patterns)."""
        s = torch.tensor(self.scale, dtype=torch.float32, device=x.device)
        if self.grid != "int":
            return fp8_codes(fp8_round(x.float() / s, FP8_FORMATS[self.grid]), FP8_FORMATS[self.grid])
        t = torch.round(x.float() / s) + float(self.zero_point)  # (…) position on the code axis
        return t.clamp_(0, self.qmax).to(torch.uint8)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """S·(codes(x) − Z) in ``x``'s dtype: what a layer with this input quantizer multiplies."""
        s = torch.tensor(self.scale, dtype=torch.float32, device=x.device)
        if self.grid != "int":
            return (fp8_round(x.float() / s, FP8_FORMATS[self.grid]) * s).to(x.dtype)
        t = torch.round(x.float() / s) + float(self.zero_point)
        return ((t.clamp_(0, self.qmax) - float(self.zero_point)) * s).to(x.dtype)

    def to_record(self) -> dict:
        """The header record (JSON): bits, scale, zero point, calibrator (and "grid" when not "int")."""
        rec = {"bits": self.bits, "scale": self.scale, "zero_point": self.zero_point, "calibrator": self.calibrator}
        return rec if self.grid == "int" else {**rec, "grid": self.grid}

    @classmethod
    def from_record(cls, rec) -> "ActQuantizer":
        """Rebuild from :meth:`to_record`'s output; every value checked (one-line ValueError)."""
        keys = {"bits", "scale", "zero_point", "calibrator"}
        if not isinstance(rec, dict) or not keys <= set(rec) <= keys | {"grid"}:
            raise ValueError(f"activation record must have bits, scale, zero_point, calibrator (and may have grid); "
                             f"got {str(rec)[:80]}")
        grid = rec.get("grid", "int")
        if not isinstance(grid, str) or grid not in ACT_GRIDS or grid == "int" and "grid" in rec:
            raise ValueError(f"activation grid {str(grid)[:30]!r} is not one of {', '.join(ACT_GRIDS[1:])}")
        if not isinstance(rec["calibrator"], str) or rec["calibrator"] not in CLIPPING_METHODS:
            raise ValueError(f"activation calibrator {str(rec['calibrator'])[:30]!r} is not one of "
                             f"{', '.join(CLIPPING_METHODS)}")
        if isinstance(rec["bits"], bool) or not isinstance(rec["bits"], int):
            raise ValueError(f"activation bits {str(rec['bits'])[:20]} is not an integer")
        scale = rec["scale"]
        if isinstance(scale, int) and not isinstance(scale, bool):
            scale = float(scale)
        return cls(bits=rec["bits"], scale=scale, zero_point=rec["zero_point"], calibrator=rec["calibrator"],
                   grid=grid)


@dataclass(frozen=True)
class TokenActQuantizer:
    """A per-token dynamic activation quantizer: each token (each row: every index of the leading
    dimensions, the last dimension being the channels) gets its own asymmetric ``bits``-bit range
    at run time, its min and max widened to contain 0 (codes 0..2^b − 1, integer zero point, as
    ``core.intmatmul.quantize_activations_dynamic`` with ``granularity="row"``, the row quantizer of
    the int8 dynamic path).  Nothing is calibrated: the record holds only the width.  Asymmetric
    rather than symmetric so that post-activation rows (mostly one sign) keep every level; at 8 bits
    the two differ little.  Used on Linear inputs of language models (Xiao et al. 2023 pair it with
    SmoothQuant); a token's outlier then costs only that token's resolution."""

    bits: int  # code width, 1..8

    granularity = "token"  # one range per token (row), computed at run time (class attribute, not a field)
    calibrator = "dynamic"  # nothing calibrated (informational, as ActQuantizer.calibrator)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"activation bits {str(self.bits)[:20]} is not an integer")
        check_bits(self.bits, "activation bits")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Each row of ``x`` (…, K) on its own min–max grid, dequantized, in ``x``'s dtype."""
        xa = quantize_activations_dynamic(x, self.bits, symmetric=False)  # q (…, K), scale/zp (…, 1)
        return ((xa.q.float() - xa.zero_point) * xa.scale).to(x.dtype)

    def to_record(self) -> dict:
        """The header record (JSON): bits and granularity "token"."""
        return {"bits": self.bits, "granularity": "token"}


def act_quantizer_from_record(rec) -> "ActQuantizer | TokenActQuantizer":
    """An input quantizer from its header record: a per-token one when the record says
    ``"granularity": "token"`` (keys bits, granularity), else a per-tensor :class:`ActQuantizer`
    (no granularity key, as files written before per-token quantizers existed).  Every value is
    checked; anything else is one ValueError line."""
    if isinstance(rec, dict) and "granularity" in rec:
        g = rec["granularity"]
        if not isinstance(g, str) or g not in ACT_GRANULARITIES or g == "tensor":
            raise ValueError(f"activation granularity {str(g)[:30]!r} is not 'token' (a per-tensor record has no "
                             "granularity key)")
        if set(rec) != {"bits", "granularity"}:
            raise ValueError(f"per-token activation record must have bits, granularity; got {str(rec)[:80]}")
        return TokenActQuantizer(bits=rec["bits"])
    return ActQuantizer.from_record(rec)


def sample_values(xs: list[torch.Tensor], k: int = ACT_SAMPLE, seed: int = 0) -> torch.Tensor:
    """A seeded sample of at most ``k`` values drawn from the tensors ``xs`` (all their entries),
    uniformly with replacement, each tensor contributing in proportion to its size; all values
    when there are at most ``k``.  Returns a 1-D float32 tensor."""
    total = sum(x.numel() for x in xs)
    if total == 0:
        raise ValueError("no activation values to calibrate on")
    if total <= k:
        return torch.cat([x.detach().reshape(-1).float() for x in xs])
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for x in xs:
        n = x.numel()
        m = max(1, round(k * n / total))
        idx = torch.randint(0, n, (m,), generator=gen)  # (m,) positions in the flattened tensor
        parts.append(x.detach().reshape(-1)[idx.to(x.device)].float().cpu())
    return torch.cat(parts)


def calibrate_activation(values: torch.Tensor, bits: int, calibrator: str = "mse", *,
                         percentile: float = 99.99, grid: str = "int") -> ActQuantizer:
    """The per-tensor asymmetric ``bits``-bit quantizer whose range ``calibrator`` chooses on ``values``.

    Args:
        values: a 1-D sample of the activations (e.g. :func:`sample_values`), finite.
        bits: code width, 1..8.
        calibrator: one of ``ACT_CALIBRATORS`` (``"aciq"`` is ACIQ with the Laplace prior).
        percentile: for ``"percentile"``: the upper/lower percentile kept.
        grid: "int", or "fp8-e4m3" / "fp8-e5m2" (8 bits): a symmetric FP8 quantizer whose scale maps
            the calibrated clipping value max(|lo|, |hi|) to the format's max.
    An all-zero sample gets the smallest float32 step (every input then maps to 0 or a clamp end).
    """
    check_bits(bits, "activation bits")
    method = check_act_calibrator(calibrator)
    check_act_grid(grid, bits)
    spec = GridSpec.default(bits, symmetric=False) if grid == "int" else GridSpec(8, grid)
    rows = values.reshape(1, -1).double()  # (1, n): one block, the whole tensor
    lo, hi = calibrate(rows, method, spec, percentile=percentile)  # each (1,)
    if grid != "int":
        s = float(spec.qparams_from_range(lo, hi)[0].float().item())
        return ActQuantizer(bits=8, scale=s if s > 0 else float(torch.finfo(torch.float32).tiny), zero_point=0,
                            calibrator=method, grid=grid)
    scale, zp = spec.qparams_from_range(lo, hi)  # (1,) each
    s = float(scale.float().item())
    if not s > 0:
        s = float(torch.finfo(torch.float32).tiny)
    # the zero point from the float32 step, so that 0.0 maps exactly to the code Z
    z = int(min(max(round(-float(lo.item()) / s), 0), spec.qmax))
    return ActQuantizer(bits=bits, scale=s, zero_point=z, calibrator=method)
