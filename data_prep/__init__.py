"""Data preparation: corpus readers, SentencePiece tokenizer, packed WebDataset shards.

Knows nothing of the model: ``prepare(data_config, seq_len=..., seed=...)`` is its entry.
"""
