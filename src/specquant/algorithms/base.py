"""What the engine hands an algorithm: second-moment statistics of a layer's inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Streaming input statistics of one layer, in the covariance form.

    X is the (m, N0) matrix of the layer's inputs in the float model and X̃ the matching
    inputs in the partly quantized model (rows are samples or conv patches).  Only N0×N0
    products are kept, so memory does not grow with the number of calibration samples.
    """

    H: torch.Tensor  # (N0, N0) float64: X̃ᵀX̃
    G: torch.Tensor  # (N0, N0) float64: X̃ᵀX (row index follows X̃, column index follows X)
    F: torch.Tensor | None  # (N0, N0) float64: XᵀX, or None when only ``energy`` was recorded
    n_rows: int  # m, rows (samples × positions) accumulated
    mean_x: torch.Tensor  # (N0,) float64: column means of X
    mean_xt: torch.Tensor  # (N0,) float64: column means of X̃
    energy: torch.Tensor | None = None  # (out,) float64: ‖X w_i‖² for the layer's own weights W

    def target_energy(self, W: torch.Tensor) -> torch.Tensor:
        """‖X w_i‖² per row of ``W`` (out, N0): from F when kept, else the recorded energies
        (which belong to the layer's own weights; K stacked copies of them are accepted)."""
        if self.F is not None:
            from specquant.algorithms.common import target_energy

            return target_energy(W, self.F)
        if self.energy is None:
            raise ValueError("these statistics hold neither F = XᵀX nor output energies")
        k, r = divmod(W.shape[0], self.energy.numel())
        if r or k == 0:
            raise ValueError(f"output energies were recorded for {self.energy.numel()} rows, "
                             f"not {W.shape[0]}; collect F (keep_f=True) for other weights")
        return self.energy.repeat(k)

    @property
    def dim(self) -> int:
        return self.H.shape[0]


@dataclass
class QuantConfig:
    """Settings shared by every method; each method's config extends it.

    Per-layer overrides give mixed precision: ``overrides={"layer1.*": 8}`` (fnmatch pattern
    or exact module name → bits).
    """

    bits: int = 4  # storage bits per weight code, 1..8 (codes always fit in this many bits)
    granularity: str = "channel"  # "channel" (per output channel), "tensor", or "group:G"
    symmetric: bool = True  # narrow symmetric grid (2^b − 1 levels; binary at 1 bit) or asymmetric
    seed: int = 0  # seed for every random choice (stochastic rounding, patch subsampling)
    overrides: dict = field(default_factory=dict)  # {module name or fnmatch pattern: bits}
    skip: tuple = ()  # module names or fnmatch patterns left in float
    bias_correction: bool = False  # shift each output channel's bias to match the float mean output
    row_bits: dict = field(default_factory=dict)  # {module name: (width of output row 0, row 1, …)}: mixed rows

    method = "base"  # the method's name (class attribute, not a field)
    needs_data = False  # whether the engine must stream calibration statistics

    def bits_for(self, name: str) -> int:
        """Bits for the module ``name`` after applying ``overrides`` (exact name wins over patterns)."""
        import fnmatch

        if name in self.overrides:
            return int(self.overrides[name])
        for pat, b in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                return int(b)
        return self.bits

    def row_bits_for(self, name: str, rows: int) -> tuple[int, ...] | None:
        """Per-row widths of module ``name`` (exact name only), checked against its ``rows``; else None.

        Rows mixing widths need per-channel granularity; every row is quantized on the default
        grid of its own width, and the layer is stored with each row at that width.
        """
        if name not in self.row_bits:
            return None
        from specquant.core.grid import check_bits

        widths = tuple(self.row_bits[name])
        if len(widths) != rows:
            raise ValueError(f"row_bits for layer '{name}' has {len(widths)} widths, the layer has {rows} rows")
        for b in widths:
            check_bits(b, f"row width of layer '{name}'")
        if self.granularity != "channel":
            raise ValueError(f"layer '{name}': per-row widths need granularity 'channel', not {self.granularity!r}")
        return tuple(int(b) for b in widths)

    def skips(self, name: str) -> bool:
        import fnmatch

        return any(name == p or fnmatch.fnmatchcase(name, p) for p in self.skip)
