"""Tensor-level, pure functions: grids, rounding, clipping, packing, metrics, spectra, frames."""
