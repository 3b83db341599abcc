"""Parallel plumbing beside the model: process groups, CPU compatibility, DeepSpeed glue."""
