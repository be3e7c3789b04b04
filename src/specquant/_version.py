"""The version of specquant (io and cli read it here, never from the package root)."""
__version__ = "0.1.0"
