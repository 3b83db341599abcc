"""Softmax attention, optionally with a relative-distance bias, split over context-parallel
ranks: NoPE, learned, sinusoidal and RoPE (no bias; their positions are already in q, k)
and ALiBi and T5 (a bias that is a function of the global distance i − j).

Why not a library: Megatron-Core's CP attention is TransformerEngine's (CUDA only, no
ALiBi under CP), and PyTorch's ``context_parallel`` dispatches only the CUDA SDPA kernels
and hands its per-chunk op no positions, so it cannot add a bias from global offsets. This
is one ring (``ops.context_parallel.ring``) with a per-pair block:
  forward  each (query chunk, key chunk) pair gives softmax over its keys and a log-sum-exp;
           partials merge by log-sum-exp. Saved: local q, k, v, out, lse.
  backward recompute each pair's probabilities P from the final lse; dv = Pᵀ·dO,
           dS = P ⊙ (dO·vᵀ − rowsum(dO ⊙ O)), dq = s·dS·k, dk = s·dSᵀ·q; dK, dV travel home
           behind their chunks. The bias gradient sums dS over the pairs' distances.
The bias enters as a vector per head over distances 0..S−1 (``distance_bias``), so its
gradient flows to the PE's own parameters through ordinary autograd outside the ring.
"""

from __future__ import annotations

import torch

from cope_megatron.ops.context_parallel.ring import ContextParallel, rows
from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype
from cope_megatron.ops.plain_attention import merge_softmax


class _PairLogits:
    """Scaled logits of one pair plus the distance bias and the causal mask."""

    def __init__(self, cp: ContextParallel, c: int, bias: torch.Tensor | None,
                 device: torch.device) -> None:
        self.cp, self.c, self.bias, self.device = cp, c, bias, device

    def distances(self, pair) -> torch.Tensor:
        q_pos = self.cp.positions(pair.q_global, self.c, self.device)
        k_pos = self.cp.positions(pair.k_global, self.c, self.device)
        return (q_pos[:, None] - k_pos[None, :]).clamp(min=0)  # [c, c]

    def __call__(self, q, k, pair, scale: float) -> torch.Tensor:
        logits = scale * (q @ k.transpose(-1, -2))  # [b, h, c, c]
        if self.bias is not None:
            logits = logits + self.bias[:, self.distances(pair)]
        if pair.diagonal:
            future = torch.ones(self.c, self.c, dtype=torch.bool, device=self.device).triu(1)
            logits = logits.masked_fill(future, float("-inf"))
        return logits


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, cp: ContextParallel, scale: float):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q = q.to(work)
        h, c = q.shape[1], q.shape[2] // 2
        bias_w = None if bias is None else bias.to(work)
        logits_of = _PairLogits(cp, c, bias_w, q.device)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)

        def visit(owner: int, kv: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t.to(work), h) for t in kv)
            for pair in cp.pairs(owner):
                logits = logits_of(rows(q, pair.q, c), rows(ke, pair.k, c), pair, scale)
                part_lse = torch.logsumexp(logits, -1)
                part = torch.exp(logits - part_lse[..., None]) @ rows(ve, pair.k, c)
                merge_softmax(rows(out, pair.q, c), rows(lse, pair.q, c), part, part_lse)

        cp.ring([k, v], visit)
        ctx.save_for_backward(q, k, v, bias_w, out, lse)
        ctx.cfg = (cp, scale, dtype, None if bias is None else bias.dtype)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        cp, scale, dtype, bias_dtype = ctx.cfg
        work = q.dtype
        h, kv_heads, c = q.shape[1], k.shape[1], q.shape[2] // 2
        logits_of = _PairLogits(cp, c, bias, q.device)
        d_out = d_out.to(work).contiguous()
        delta = (d_out * out).sum(-1)
        dq = torch.zeros_like(q)
        d_bias = None if bias is None else torch.zeros_like(bias)

        def visit(owner: int, kv: list[torch.Tensor]) -> list[torch.Tensor]:
            ke, ve = (expand_kv(t.to(work), h) for t in kv)
            dke, dve = torch.zeros_like(ke), torch.zeros_like(ve)
            for pair in cp.pairs(owner):
                q_c, k_c, v_c = rows(q, pair.q, c), rows(ke, pair.k, c), rows(ve, pair.k, c)
                do_c = rows(d_out, pair.q, c)
                probs = torch.exp(logits_of(q_c, k_c, pair, scale)
                                  - rows(lse, pair.q, c)[..., None])
                rows(dve, pair.k, c).add_(probs.transpose(-1, -2) @ do_c)
                d_logits = probs * (do_c @ v_c.transpose(-1, -2)
                                    - rows(delta, pair.q, c)[..., None])
                rows(dq, pair.q, c).add_(scale * (d_logits @ k_c))
                rows(dke, pair.k, c).add_(scale * (d_logits.transpose(-1, -2) @ q_c))
                if d_bias is not None:
                    dist_idx = logits_of.distances(pair).flatten()
                    d_bias.index_add_(1, dist_idx, d_logits.sum(0).flatten(1))
            return [reduce_kv_heads(dke, kv_heads), reduce_kv_heads(dve, kv_heads)]

        dk, dv = cp.ring([k, v], visit)
        return (dq.to(dtype), dk.to(k.dtype), dv.to(v.dtype),
                None if d_bias is None else d_bias.to(bias_dtype), None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel, *,
                   softmax_scale: float, distance_bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Causal softmax attention over a sequence split across ``cp``'s ranks (head-tail).

    q [b, h, 2c, d]; k, v [b, g, 2c, d]: this rank's two chunks, concatenated;
    distance_bias [h, ≥ S]: logit bias added for global distance i − j, or None.
    """
    return _RingAttention.apply(q, k, v, distance_bias, cp, softmax_scale)
