"""CoPE: contextual position encoding (Golovneva et al. 2024, arXiv 2405.18719).

Positions are counted by gates σ(q·k) rather than tokens, and position logits are read from
a learned table E (``cope_megatron.ops.cope_attention`` holds the math). As in the authors'
code, E starts at zero and is by default one table per layer shared by all heads
(``pe.cope.shared_table``); a per-head table is split over TP ranks by global head.

A shared table is replicated on every TP rank, and each rank's heads contribute part of its
gradient: passing it through Megatron's copy-to-tensor-parallel-region (identity forward,
all-reduce backward) sums those parts, whatever engine drives training.

Under context parallelism the gate sums are carried across ranks by
``ops.context_parallel.cope`` (the same function, exactly).

``cope_rope`` applies CoPE on top of RoPE-rotated queries and keys.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from torch import nn

from cope_megatron.config import Config, ConfigError, PEConfig
from cope_megatron.ops import cope_attention
from cope_megatron.ops.context_parallel.cope import cope_attention_context_parallel
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.pe import register
from cope_megatron.pe.base import AttentionShape, PositionEncoding, head_sharded_parameter


class CoPEAttention(nn.Module):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__()
        self.shape = shape
        self.npos_max = options.cope.npos_max
        self.impl = options.cope.impl
        self.shared = options.cope.shared_table
        if self.shared:
            self.table = nn.Parameter(torch.zeros(1, shape.head_dim, self.npos_max))
        else:
            full = torch.zeros(shape.total_heads, shape.head_dim, self.npos_max)
            self.table = head_sharded_parameter(full, shape)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cp: ContextParallel | None = None, starts: torch.Tensor | None = None
                ) -> torch.Tensor:
        table = self.table
        if self.shared and self.shape.tp_size > 1:
            table = tensor_parallel.copy_to_tensor_model_parallel_region(table)
        if cp is not None:
            return cope_attention_context_parallel(
                q, k, v, table, cp, npos_max=self.npos_max,
                softmax_scale=self.shape.softmax_scale, impl=self.impl, starts=starts)
        return cope_attention(q, k, v, table, npos_max=self.npos_max,
                              softmax_scale=self.shape.softmax_scale, impl=self.impl)


def check(cfg: Config) -> None:
    """What the CoPE op cannot run."""
    if cfg.pe.cope.npos_max < 2:
        raise ConfigError(f"pe.cope.npos_max: must be at least 2, got {cfg.pe.cope.npos_max}")
    if cfg.model.attention_dropout > 0:
        raise ConfigError("model.attention_dropout: the CoPE op has no attention dropout; set "
                          "model.attention_dropout=0")
    if cfg.parallel.context > 1 and cfg.pe.cope.impl == "reference":
        raise ConfigError("pe.cope.impl: the reference CoPE op materializes [s, s] logits and "
                          "cannot be split across context-parallel ranks; use auto, chunked or "
                          "triton")


register(PositionEncoding(name="cope", attention=CoPEAttention, uses_cope_op=True, check=check,
                          options=("cope",)))
register(PositionEncoding(name="cope_rope", attention=CoPEAttention, uses_cope_op=True,
                          check=check, gpt_position_embedding="rope",
                          options=("cope", "rope", "rope_scaling")))
