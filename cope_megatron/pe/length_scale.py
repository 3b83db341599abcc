"""Length-scaled softmax, for any PE: row i's attention logits are multiplied by
s_h·ln n_i, n_i = i + 1 the keys a causal row sees at its global position, s_h per head
(Scalable-Softmax, Nakanishi 2025, arXiv 2501.19399, eq. 2; with s fixed, the log-n scaling
of Chiang & Cholak 2022, arXiv 2202.12172). It counters attention fading: without it the
largest attention weight of a row shrinks as the row grows past the training length.

As the paper implements it, the query is scaled, so every PE's attention runs unchanged
on top: for NoPE and RoPE that multiplies the whole logit; CoPE's gate and position logits
are products with the query as well and scale with it (sharper gates count positions more
crisply in long rows); a distance bias (ALiBi, T5) is added unscaled.

s defaults to 1/ln(training length), so a training-length row's last query is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cope_megatron.config import LengthScaleOptions
from cope_megatron.pe.base import AttentionShape, head_sharded_parameter


def initial_s(options: LengthScaleOptions, train_length: int) -> float:
    """s (a learned s's initial value): ``pe.length_scale.s``, else 1/ln(train_length)."""
    return options.s if options.s is not None else 1.0 / math.log(train_length)


class LengthScale(nn.Module):
    """Scales queries [b, heads, s, d] at positions [s] or [b, s] (global, or within each
    token's document) by s_h·ln(position + 1)."""

    def __init__(self, shape: AttentionShape, options: LengthScaleOptions,
                 train_length: int) -> None:
        super().__init__()
        full = torch.full((shape.total_heads,), initial_s(options, train_length))
        if options.type == "learned":
            self.s = head_sharded_parameter(full, shape)
        else:
            local = full[shape.head_offset: shape.head_offset + shape.num_heads]
            self.register_buffer("s", local, persistent=False)

    def forward(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # At least fp32 whatever the module's dtype: bf16 rounds positions past 256.
        dtype = torch.promote_types(self.s.dtype, torch.float32)
        # [heads, s] or [b, heads, s]
        factor = self.s.to(dtype)[:, None] * torch.log1p(positions.to(dtype)).unsqueeze(-2)
        return q * factor[..., None].to(q.dtype)
