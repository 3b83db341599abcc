"""Head helpers every attention op shares: grouped key/value heads expanded to the query
heads and gradients reduced back, and the dtype half-precision inputs compute in."""

from __future__ import annotations

import torch


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, g, s, d] -> [b, heads, s, d], each key/value head serving heads/g query heads."""
    b, g, s, d = t.shape
    if g == heads:
        return t
    return t[:, :, None].expand(b, g, heads // g, s, d).reshape(b, heads, s, d)


def reduce_kv_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Adjoint of ``expand_kv``: [b, h, s, d] -> [b, kv_heads, s, d]."""
    b, h, s, d = t.shape
    if h == kv_heads:
        return t
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32: the gate sums and softmax need it."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
