"""Evaluation: held-out perplexity against context length."""
