"""specquant.engine."""
