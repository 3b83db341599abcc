"""ALiBi: attention with linear biases (Press et al. 2022, arXiv 2108.12409).

Head h adds −m_h·(i − j) to the logit of query i and key j. Slopes are the geometric
sequence 2^(−8k/n), k = 1..n, for n a power of two; otherwise those of the nearest lower
power of two followed by every other slope of the next one (the paper's code). Slopes are
indexed by global head, so every TP rank biases its own heads as TP=1 would.
"""

from __future__ import annotations

import math

import torch

from cope_megatron.config import PEConfig
from cope_megatron.pe import register
from cope_megatron.pe.base import AttentionShape, CausalAttention, PositionEncoding


def alibi_slopes(num_heads: int) -> torch.Tensor:
    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(geometric(num_heads))
    lower = 2 ** math.floor(math.log2(num_heads))
    extra = geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(geometric(lower) + extra)


class AlibiAttention(CausalAttention):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__(shape, options)
        slopes = alibi_slopes(shape.total_heads)
        local = slopes[shape.head_offset: shape.head_offset + shape.num_heads]
        self.register_buffer("slopes", local, persistent=False)

    def distance_bias(self, length: int, device: torch.device) -> torch.Tensor:
        return -self.slopes.to(device)[:, None] * torch.arange(length, device=device)


register(PositionEncoding(name="alibi", attention=AlibiAttention, options=("alibi",)))
