"""specquant.models."""
