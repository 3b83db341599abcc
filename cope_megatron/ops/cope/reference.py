"""CoPE attention, plainly: the ground truth for every other implementation.

Materializes the [b, h, s, s] logits, so memory is O(s²) per head. Follows the paper's
Appendix B (Golovneva et al. 2024, arXiv 2405.18719).
"""

from __future__ import annotations

import torch

from cope_megatron.ops.heads import expand_kv


def reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """y_j = Σ_{t ≥ j} x_t along the last dim. Flip-cumsum-flip: the shortcut
    ``sum − cumsum + x`` cancels catastrophically in fp32 for long rows."""
    return x.flip(-1).cumsum(-1).flip(-1)


def interpolate_positions(z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Position logits: z [..., npos] read at fractional positions pos [..., s_k] by linear
    interpolation between ⌊p⌋ and ⌈p⌉."""
    lo = pos.floor()
    frac = pos - lo
    lo = lo.long()
    hi = pos.ceil().long()
    return frac * z.gather(-1, hi) + (1 - frac) * z.gather(-1, lo)


def cope_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_emb: torch.Tensor,
    *,
    npos_max: int,
    softmax_scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d]; pos_emb [h or 1, d, npos] -> [b, h, s, d]."""
    h, s = q.shape[1], q.shape[2]
    k, v = expand_kv(k, h), expand_kv(v, h)
    logits = softmax_scale * q @ k.transpose(-1, -2)  # [b, h, s, s]
    if causal:
        future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    gates = torch.sigmoid(logits)  # masked keys: σ(−∞) = 0
    # p_ij = Σ_{t=j..i} g_it (causal: gates past i are 0); non-causal sums j..end.
    pos = reverse_cumsum(gates).clamp(max=npos_max - 1)
    z = q @ pos_emb  # [b, h, s, npos]; unscaled, as in the paper
    bias = interpolate_positions(z, pos)
    return torch.softmax(logits + bias, dim=-1) @ v
