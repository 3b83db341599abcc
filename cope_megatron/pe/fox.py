"""FoX: the Forgetting Transformer's forgetting attention (Lin et al., ICLR 2025, arXiv
2503.02130), as its basic "FoX (LLaMA)" variant: no other PE, and a forget gate per head
and token f_t = σ(w_h·x_t + b_h) from the layer's input x (``model.token_gate``; none of
the "Pro" block's extras: no output gate, output norm, QK-norm or key shift). Attention
adds D_ij = Σ_{l=j+1..i} log f_l to the logits (``ops.fox``).

The gate projection is split over TP ranks by head, like q; under context parallelism the
prefix sums of log f are carried across ranks by ``ops.context_parallel.fox``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from cope_megatron.config import Config, ConfigError, PEConfig
from cope_megatron.ops.context_parallel.fox import fox_attention_context_parallel
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.fox import fox_attention
from cope_megatron.ops.heads import work_dtype
from cope_megatron.pe import register
from cope_megatron.pe.base import AttentionShape, PositionEncoding


class FoXAttention(nn.Module):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, q, k, v, cp: ContextParallel | None = None, *, gate, starts=None):
        log_f = F.logsigmoid(gate.to(work_dtype(gate.dtype)))  # [b, h, s], ≤ 0
        if cp is not None:
            return fox_attention_context_parallel(q, k, v, log_f, cp, starts=starts,
                                                  softmax_scale=self.shape.softmax_scale)
        return fox_attention(q, k, v, log_f, softmax_scale=self.shape.softmax_scale)


def check(cfg: Config) -> None:
    """What the FoX op cannot run."""
    if cfg.model.attention_dropout > 0:
        raise ConfigError("model.attention_dropout: the FoX op has no attention dropout; set "
                          "model.attention_dropout=0")


register(PositionEncoding(name="fox", attention=FoXAttention, token_gate=True, check=check,
                          elementwise_per_key=2,  # the bias F_i − F_j and its gradient
                          fp32_output=True))
