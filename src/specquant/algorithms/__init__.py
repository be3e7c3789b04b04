"""specquant.algorithms."""
