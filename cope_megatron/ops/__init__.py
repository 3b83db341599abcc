"""Pure tensor ops: no model, no config."""

from cope_megatron.ops.cope import cope_attention

__all__ = ["cope_attention"]
