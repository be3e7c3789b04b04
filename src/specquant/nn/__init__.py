"""specquant.nn."""
