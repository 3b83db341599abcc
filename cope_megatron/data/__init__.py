"""Data, knowing nothing of the model: corpus readers and the tokenizer, preparation into
packed token shards (``prep``), and the training side's streaming, resumable loader."""
