"""LayerNorm/RMSNorm usable under sequence parallelism.

Megatron's WrappedTorchNorm refuses ``sequence_parallel`` (its Apex/TE norms are the ones
that tag parameters). This builds the torch norm and tags its parameters, so
``distributed.sequence_parallel`` can sum their partial gradients across TP ranks.
"""

from __future__ import annotations

from megatron.core.transformer import TransformerConfig
from torch import nn


class SequenceParallelNorm:
    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                **_) -> nn.Module:
        norm_cls = nn.RMSNorm if config.normalization == "RMSNorm" else nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
