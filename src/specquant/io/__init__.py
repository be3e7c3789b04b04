"""specquant.io."""
