"""specquant.mixed."""
