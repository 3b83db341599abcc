"""Softmax attention, optionally with a position bias, split over context-parallel ranks:
NoPE, learned, sinusoidal and RoPE (no bias; their positions are already in q, k) and the
bias PEs (ALiBi, T5, Kerple, FIRE: a bias of the global query and key positions).

Why not a library: Megatron-Core's CP attention is TransformerEngine's (CUDA only, no
ALiBi under CP), and PyTorch's ``context_parallel`` dispatches only the CUDA SDPA kernels
and hands its per-chunk op no positions, so it cannot add a bias from global offsets. This
is one ring (``ops.context_parallel.ring``) with a per-pair block:
  forward  each (query chunk, key chunk) pair gives softmax over its keys and a log-sum-exp;
           partials merge by log-sum-exp. Saved: local q, k, v, out, lse.
  backward recompute each pair's probabilities P from the final lse; dv = Pᵀ·dO,
           dS = P ⊙ (dO·vᵀ − rowsum(dO ⊙ O)), dq = s·dS·k, dk = s·dSᵀ·q; dK, dV travel home
           behind their chunks. The bias gradient is dS summed over the batch, pulled back
           through the pair's bias block.
The bias enters as a function of global positions and the tensors it is computed from
(``ops.position_bias``): each pair's [h, c, c] block is computed when needed (forward) and
recomputed and differentiated in the backward, so no [S, S] bias is ever held, and the
gradient of those tensors flows on to the PE's parameters through ordinary autograd.
"""

from __future__ import annotations

import torch

from cope_megatron.ops.context_parallel.ring import ContextParallel, rows
from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype
from cope_megatron.ops.plain_attention import merge_softmax
from cope_megatron.ops.position_bias import PositionBias


class _PairLogits:
    """Scaled logits of one pair plus its bias block and the causal mask."""

    def __init__(self, cp: ContextParallel, c: int, bias: PositionBias | None,
                 device: torch.device) -> None:
        self.cp, self.c, self.bias, self.device = cp, c, bias, device

    def bias_block(self, pair, bias: PositionBias) -> torch.Tensor:
        """[h, c, c]: ``bias`` at the pair's global query and key positions."""
        return bias.block(self.cp.positions(pair.q_global, self.c, self.device),
                          self.cp.positions(pair.k_global, self.c, self.device))

    def __call__(self, q, k, pair, scale: float, block: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``block``: the pair's bias block when the caller has it already."""
        logits = scale * (q @ k.transpose(-1, -2))  # [b, h, c, c]
        if self.bias is not None:
            block = self.bias_block(pair, self.bias) if block is None else block.detach()
            logits = logits + block.to(logits.dtype)
        if pair.diagonal:
            future = torch.ones(self.c, self.c, dtype=torch.bool, device=self.device).triu(1)
            logits = logits.masked_fill(future, float("-inf"))
        return logits


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, scale: float, bias_fn, *bias_tensors):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q = q.to(work)
        h, c = q.shape[1], q.shape[2] // 2
        # The bias is computed from work-dtype copies of its tensors, here and in the
        # backward's recomputation alike (so that its gradient accumulates in fp32 too).
        bias = None if bias_fn is None else PositionBias(
            bias_fn, tuple(t.to(work) for t in bias_tensors))
        logits_of = _PairLogits(cp, c, bias, q.device)
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
        ctx.save_for_backward(q, k, v, out, lse, *bias_tensors)
        ctx.cfg = (cp, scale, dtype, bias_fn)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, *bias_tensors = ctx.saved_tensors
        cp, scale, dtype, bias_fn = ctx.cfg
        work = q.dtype
        h, kv_heads, c = q.shape[1], k.shape[1], q.shape[2] // 2
        wants = ctx.needs_input_grad[6:]
        leaves = [t.detach().to(work).requires_grad_(w) for t, w in zip(bias_tensors, wants)]
        bias = None if bias_fn is None else PositionBias(bias_fn, tuple(leaves))
        logits_of = _PairLogits(cp, c, bias, q.device)
        d_out = d_out.to(work).contiguous()
        delta = (d_out * out).sum(-1)
        dq = torch.zeros_like(q)
        d_bias = [torch.zeros_like(t) if w else None for t, w in zip(leaves, wants)]
        wanted = [t for t, w in zip(leaves, wants) if w]

        def visit(owner: int, kv: list[torch.Tensor]) -> list[torch.Tensor]:
            ke, ve = (expand_kv(t.to(work), h) for t in kv)
            dke, dve = torch.zeros_like(ke), torch.zeros_like(ve)
            for pair in cp.pairs(owner):
                q_c, k_c, v_c = rows(q, pair.q, c), rows(ke, pair.k, c), rows(ve, pair.k, c)
                do_c = rows(d_out, pair.q, c)
                block = None
                if wanted:
                    with torch.enable_grad():
                        block = logits_of.bias_block(pair, bias)
                probs = torch.exp(logits_of(q_c, k_c, pair, scale, block)
                                  - rows(lse, pair.q, c)[..., None])
                rows(dve, pair.k, c).add_(probs.transpose(-1, -2) @ do_c)
                d_logits = probs * (do_c @ v_c.transpose(-1, -2)
                                    - rows(delta, pair.q, c)[..., None])
                rows(dq, pair.q, c).add_(scale * (d_logits @ k_c))
                rows(dke, pair.k, c).add_(scale * (d_logits.transpose(-1, -2) @ q_c))
                if wanted:
                    _accumulate(d_bias, wanted, block, d_logits.sum(0))
            return [reduce_kv_heads(dke, kv_heads), reduce_kv_heads(dve, kv_heads)]

        dk, dv = cp.ring([k, v], visit)
        return (dq.to(dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None,
                *(None if g is None else g.to(t.dtype) for g, t in zip(d_bias, bias_tensors)))


def _accumulate(d_bias: list, wanted: list[torch.Tensor], block: torch.Tensor,
                d_block: torch.Tensor) -> None:
    """Add the pullback of ``d_block`` through ``block`` (computed from ``wanted``) to the
    matching entries of ``d_bias``."""
    grads = iter(torch.autograd.grad(block, wanted, d_block.to(block.dtype),
                                     allow_unused=True, materialize_grads=True))
    for g in d_bias:
        if g is not None:
            g.add_(next(grads))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel, *,
                   softmax_scale: float, bias: PositionBias | None = None) -> torch.Tensor:
    """Causal softmax attention over a sequence split across ``cp``'s ranks (head-tail).

    q [b, h, 2c, d]; k, v [b, g, 2c, d]: this rank's two chunks, concatenated;
    ``bias``: the logit bias of this rank's heads at global positions, or None.
    """
    if bias is None:
        return _RingAttention.apply(q, k, v, cp, softmax_scale, None)
    return _RingAttention.apply(q, k, v, cp, softmax_scale, bias.fn, *bias.tensors)
