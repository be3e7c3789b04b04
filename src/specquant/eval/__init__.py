"""Evaluation protocols: perplexity of causal language models (one protocol, stated in every report)."""
