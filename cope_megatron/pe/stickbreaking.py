"""Stick-breaking attention (Tan et al., ICLR 2025, arXiv 2410.17980): no softmax and no
other PE; query i gives key j < i the weight β_ij Π_{j<t<i} (1 − β_it), β = σ(q·k·scale),
and what is left of the stick to its own value, as the authors' code does
(``ops.stickbreaking``). No parameters of its own. Under context parallelism each row's
log-survival is carried across ranks by ``ops.context_parallel.stickbreaking``.
"""

from __future__ import annotations

from torch import nn

from cope_megatron.config import Config, ConfigError, PEConfig
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.context_parallel.stickbreaking import (
    stickbreaking_attention_context_parallel,
)
from cope_megatron.ops.stickbreaking import stickbreaking_attention
from cope_megatron.pe import register
from cope_megatron.pe.base import AttentionShape, PositionEncoding


class StickBreakingAttention(nn.Module):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, q, k, v, cp: ContextParallel | None = None, starts=None):
        if cp is not None:
            return stickbreaking_attention_context_parallel(
                q, k, v, cp, softmax_scale=self.shape.softmax_scale, starts=starts)
        return stickbreaking_attention(q, k, v, softmax_scale=self.shape.softmax_scale)


def check(cfg: Config) -> None:
    if cfg.model.attention_dropout > 0:
        raise ConfigError("model.attention_dropout: the stick-breaking op has no attention "
                          "dropout; set model.attention_dropout=0")


# softplus (exp, log1p), the running sum, exp of the log weight, its gradient's sigmoid
# and cumulative sum: about 10 elementwise operations per key, as CoPE's.
register(PositionEncoding(name="stickbreaking", attention=StickBreakingAttention, check=check,
                          elementwise_per_key=10, fp32_output=True))
