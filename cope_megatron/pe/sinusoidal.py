"""Fixed sinusoidal absolute positions added to the token embeddings (Vaswani et al. 2017,
§3.5): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...). Computed on the fly,
so any length works."""

from __future__ import annotations

import math

import torch
from torch import nn

from cope_megatron.pe import register
from cope_megatron.pe.base import PositionEncoding


class SinusoidalPositions(nn.Module):
    """Position ids [b, s] -> embeddings [b, s, hidden]; replaces GPTModel's learned table."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32,
                 base: float = 10000.0) -> None:
        super().__init__()
        # ``dtype``: the model's activation dtype (bf16 under DeepSpeed bf16, which casts
        # parameters but not this module's output); the angles themselves stay fp32.
        self.hidden_size, self.dtype, self.base = hidden_size, dtype, base

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        dims = torch.arange(0, self.hidden_size, 2, device=position_ids.device)
        inv_freq = torch.exp(-math.log(self.base) * dims / self.hidden_size)
        angles = position_ids[..., None].float() * inv_freq  # [b, s, hidden/2]
        emb = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
        return emb[..., : self.hidden_size].to(self.dtype)


register(
    PositionEncoding(
        name="sinusoidal",
        gpt_position_embedding="learned_absolute",
        position_embedding=SinusoidalPositions,
    )
)
