"""Megatron-Core GPTModel assembled from a position encoding's layer spec."""
