"""Softmax attention over keys that all share one position logit per row, with its
log-sum-exp: the part of a CoPE row beyond the clamp, where the op is plain attention;
and the log-sum-exp merge of partial softmax results (also what context parallelism folds
its key chunks with).

Forward returns (out, lse) so the caller merges it with the near keys by log-sum-exp;
backward takes the merged row's output and lse. ``flash``: PyTorch's fused CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward: public SDPA
returns no lse and takes no outside normalizer); otherwise the same math in matrix
products, ``MATH_ROWS`` query rows at a time so that the logits held stay
[MATH_ROWS, keys] per head (what other devices run; ``ops.cope.paths`` chooses).
"""

from __future__ import annotations

import torch

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
MATH_ROWS = 128


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, row0: int
            ) -> torch.Tensor:
    """Logits of rows row0… of the call; causal as the fused kernel, aligned at the top
    left: row r sees keys 0…r."""
    logits = scale * (q @ k.transpose(-1, -2))
    if causal:
        rows = torch.arange(row0, row0 + q.shape[2], device=q.device)
        later = torch.arange(k.shape[2], device=q.device) > rows[:, None]
        logits = logits.masked_fill(later, float("-inf"))
    return logits


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool = False, *, flash: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale·q·kᵀ)·v and its row log-sum-exp: [b, h, m, d], [b, h, m]. ``causal``:
    row r sees keys 0…r only (aligned at the top left, also when m differs from the keys)."""
    if flash:
        return _flash_forward(q, k, v, 0.0, causal, scale=scale)
    return _math_forward(q, k, v, scale, causal)


def _math_forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    for r0 in range(0, q.shape[2], MATH_ROWS):
        rows = slice(r0, r0 + MATH_ROWS)
        logits = _logits(q[:, :, rows], k, scale, causal, r0)
        lse[:, :, rows] = torch.logsumexp(logits, dim=-1)
        out[:, :, rows] = torch.exp(logits - lse[:, :, rows, None]) @ v
    return out, lse


def attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool = False,
                       *, flash: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of rows whose probabilities are exp(scale·q·kᵀ − lse) (lse from the
    whole row, so these keys may hold only part of its mass; ``out`` is the whole row's
    output): ds = P ⊙ (dO·vᵀ − Δ), Δ = rowsum(dO ⊙ out)."""
    if flash:
        # The kernel takes O only for Δ, so the whole row's output gives the right one.
        return _flash_backward(d_out, q, k, v, out, lse.to(q.dtype), 0.0, causal, scale=scale)
    return _math_backward(d_out, q, k, v, out, lse, scale, causal)


def _math_backward(d_out, q, k, v, out, lse, scale: float, causal: bool):
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (d_out * out).sum(-1, keepdim=True)
    for r0 in range(0, q.shape[2], MATH_ROWS):
        rows = slice(r0, r0 + MATH_ROWS)
        probs = torch.exp(_logits(q[:, :, rows], k, scale, causal, r0)
                          - lse[:, :, rows, None])
        ds = probs * (d_out[:, :, rows] @ v.transpose(-1, -2) - delta[:, :, rows])
        dq[:, :, rows] = scale * (ds @ k)
        dk += scale * (ds.transpose(-1, -2) @ q[:, :, rows])
        dv += probs.transpose(-1, -2) @ d_out[:, :, rows]
    return dq, dk, dv


def merge_softmax(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor,
                  part_lse: torch.Tensor) -> None:
    """Fold a partial softmax result over other keys into (out, lse), in place:
    both are normalized over their own keys, so each is weighted by its share of the total."""
    new = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - new)[..., None]).add_(part_out * torch.exp(part_lse - new)[..., None])
    lse.copy_(new)
