"""Data preparation: tokenizer training, packing and WebDataset shard writing
(``prepare(data_config, seq_len=..., seed=...)``), and the synthetic tasks (``tasks``).
``python -m cope_megatron.data.prep`` is ``cope-megatron prep``."""
