"""specquant.qat."""
