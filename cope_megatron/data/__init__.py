"""Training-side data: streaming packed token shards."""
