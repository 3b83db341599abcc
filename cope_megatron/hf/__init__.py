"""Hugging Face interop: export to a transformers model directory, downstream evaluation."""
