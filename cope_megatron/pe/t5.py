"""T5 relative position bias (Raffel et al. 2020, arXiv 1910.10683, §2.1).

A learned scalar per (bucket, head) is added to the logits; causal buckets cover the
distance i − j exactly up to num_buckets/2 and logarithmically up to max_distance, beyond
which all distances share the last bucket (so any length runs). The table's rows are global
heads, split over TP ranks; it is drawn whole on every rank so init does not depend on TP.
"""

from __future__ import annotations

import math

import torch

from cope_megatron.config import PEConfig
from cope_megatron.pe import register
from cope_megatron.pe.base import (
    AttentionShape,
    CausalAttention,
    PositionEncoding,
    head_sharded_parameter,
)


def relative_buckets(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal (unidirectional) T5 buckets of non-negative distances."""
    exact = num_buckets // 2
    log_bucket = exact + (
        torch.log(distance.float().clamp(min=1) / exact)
        / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return torch.where(distance < exact, distance, log_bucket)


class T5BiasAttention(CausalAttention):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__(shape, options)
        self.num_buckets = options.t5.num_buckets
        self.max_distance = options.t5.max_distance
        full = torch.randn(shape.total_heads, self.num_buckets) * shape.init_std
        self.bias = head_sharded_parameter(full, shape)  # [local heads, buckets]

    def distance_bias(self, length: int, device: torch.device) -> torch.Tensor:
        buckets = relative_buckets(torch.arange(length, device=device), self.num_buckets,
                                   self.max_distance)
        return self.bias[:, buckets]  # [h, length]


register(PositionEncoding(name="t5", attention=T5BiasAttention, options=("t5",)))
