"""Softmax attention over keys that all share one position logit per row, with its
log-sum-exp: the part of a CoPE row beyond the clamp, where the op is plain attention;
and the log-sum-exp merge of partial softmax results (also what context parallelism folds
its key chunks with).

Forward returns (out, lse) so the caller merges it with the near keys by log-sum-exp;
backward takes the merged row's output and lse. On the CPU this runs
PyTorch's fused flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and
its backward: public SDPA returns no lse and takes no outside normalizer); elsewhere it is
the same math in matrix products.
"""

from __future__ import annotations

import torch

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    logits = scale * (q @ k.transpose(-1, -2))
    if causal:  # top-left aligned, as the fused kernel: row r sees keys 0…r
        later = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(later, float("-inf"))
    return logits


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale·q·kᵀ)·v and its row log-sum-exp: [b, h, m, d], [b, h, m]. ``causal``:
    row r sees keys 0…r only (aligned at the top left, also when m differs from the keys)."""
    if q.device.type == "cpu":
        return _flash_forward(q, k, v, 0.0, causal, scale=scale)
    logits = _logits(q, k, scale, causal)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]) @ v, lse


def attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of rows whose probabilities are exp(scale·q·kᵀ − lse) (lse from the
    whole row, so these keys may hold only part of its mass; ``out`` is the whole row's
    output): ds = P ⊙ (dO·vᵀ − Δ), Δ = rowsum(dO ⊙ out)."""
    if q.device.type == "cpu":
        # The kernel takes O only for Δ, so the whole row's output gives the right one.
        return _flash_backward(d_out, q, k, v, out, lse.to(q.dtype), 0.0, causal, scale=scale)
    probs = torch.exp(_logits(q, k, scale, causal) - lse[..., None])
    ds = probs * (d_out @ v.transpose(-1, -2) - (d_out * out).sum(-1, keepdim=True))
    return scale * (ds @ k), scale * (ds.transpose(-1, -2) @ q), probs.transpose(-1, -2) @ d_out


def merge_softmax(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor,
                  part_lse: torch.Tensor) -> None:
    """Fold a partial softmax result over other keys into (out, lse), in place:
    both are normalized over their own keys, so each is weighted by its share of the total."""
    new = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - new)[..., None]).add_(part_out * torch.exp(part_lse - new)[..., None])
    lse.copy_(new)
