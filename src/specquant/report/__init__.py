"""specquant.report."""
