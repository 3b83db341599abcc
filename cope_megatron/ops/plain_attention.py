"""Softmax attention over keys that all share one position logit per row, with its
log-sum-exp: the part of a CoPE row beyond the clamp, where the op is plain attention;
and the log-sum-exp merge of partial softmax results (also what context parallelism folds
its key chunks with).

Forward returns (out, lse) so the caller merges it with the near keys by log-sum-exp;
backward takes the merged row's lse and Δ = rowsum(dO ⊙ O) and also returns each row's
Σ_j dL/dlogit_ij, the gradient of the shared position logit. On the CPU this runs
PyTorch's fused flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu`` and
its backward: public SDPA returns no lse and takes no outside normalizer); elsewhere it is
the same math in matrix products.
"""

from __future__ import annotations

import torch

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal softmax(scale·q·kᵀ)·v and its row log-sum-exp: [b, h, m, d], [b, h, m]."""
    if q.device.type == "cpu":
        return _flash_forward(q, k, v, 0.0, False, scale=scale)
    logits = scale * (q @ k.transpose(-1, -2))
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]) @ v, lse


def _with_column(t: torch.Tensor, value) -> torch.Tensor:
    column = value[..., None] if isinstance(value, torch.Tensor) else t.new_full((), value)
    return torch.cat([t, column.expand(*t.shape[:-1], 1).to(t.dtype)], dim=-1)


def attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lse: torch.Tensor, delta: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, ...]:
    """Gradients of rows whose probabilities are exp(scale·q·kᵀ − lse) (lse from the whole
    row, so these keys may hold only part of its mass): (dq, dk, dv, Σ_j ds_ij) with
    ds = P ⊙ (dO·vᵀ − Δ)."""
    if q.device.type != "cpu":
        probs = torch.exp(scale * (q @ k.transpose(-1, -2)) - lse[..., None])
        ds = probs * (d_out @ v.transpose(-1, -2) - delta[..., None])
        return (scale * (ds @ k), scale * (ds.transpose(-1, -2) @ q),
                probs.transpose(-1, -2) @ d_out, ds.sum(-1))
    # The kernel recomputes Δ from (dO, O) and returns no Σ ds; one extra column carries
    # both: q' = [q, 0], k' = [k, 1] keep the logits and make dq' end in scale·Σ_j ds_ij;
    # v' = [v, 0], dO' = [dO, 1], O' = [0, Δ] make dO'·v' = dO·v and dO'·O' = Δ.
    dq, dk, dv = _flash_backward(
        _with_column(d_out, 1.0), _with_column(q, 0.0), _with_column(k, 1.0),
        _with_column(v, 0.0), _with_column(torch.zeros_like(d_out), delta),
        lse.to(q.dtype), 0.0, False, scale=scale)
    return dq[..., :-1], dk[..., :-1], dv[..., :-1], dq[..., -1] / scale


def merge_softmax(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor,
                  part_lse: torch.Tensor) -> None:
    """Fold a partial softmax result over other keys into (out, lse), in place:
    both are normalized over their own keys, so each is weighted by its share of the total."""
    new = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - new)[..., None]).add_(part_out * torch.exp(part_lse - new)[..., None])
    lse.copy_(new)
