"""Data, knowing nothing of the model: corpus readers and the tokenizer, preparation into
packed token shards (``prep``), the proof that a shard is whole (``integrity``), and the
training side's streaming, resumable loader."""
