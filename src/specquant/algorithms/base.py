"""What the engine hands an algorithm: second-moment statistics of a layer's inputs."""
from __future__ import annotations

from dataclasses import dataclass

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
    F: torch.Tensor  # (N0, N0) float64: XᵀX
    n_rows: int  # m, rows (samples × positions) accumulated
    mean_x: torch.Tensor  # (N0,) float64: column means of X
    mean_xt: torch.Tensor  # (N0,) float64: column means of X̃

    @property
    def dim(self) -> int:
        return self.H.shape[0]
