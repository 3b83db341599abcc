"""Softmax attention, optionally with a position bias, split over context-parallel ranks:
NoPE, learned, sinusoidal and RoPE (no bias; their positions are already in q, k) and the
bias PEs (ALiBi, T5, Kerple, FIRE: a bias of the global query and key positions).

Why not a library: Megatron-Core's CP attention is TransformerEngine's (CUDA only, no
ALiBi under CP), and PyTorch's ``context_parallel`` dispatches only the CUDA SDPA kernels
and hands its per-chunk op no positions, so it cannot add a bias from global offsets. This
is one ring (``ops.context_parallel.ring``) with a per-pair block:
  forward  each (query chunk, key chunk) pair gives softmax over its keys and a log-sum-exp;
           partials merge by log-sum-exp. Saved: local q, k, v, out, lse.
  backward from the final lse, each pair's dq, dk, dv (dS = P ⊙ (dO·vᵀ − rowsum(dO ⊙ O)));
           dK, dV travel home behind their chunks. The bias gradient is dS summed over the
           batch, pulled back through the pair's bias block.
No pair holds its [b, h, c, c] logits: without a bias a pair is one call of the plain
attention of ``ops.plain_attention`` (the CPU's fused flash kernel, or matrix products in
row blocks elsewhere), its backward one per block of ``PLAIN_BLOCK`` rows and keys; with
one, the pair runs in row blocks of ``BLOCK_ELEMENTS`` logits.
The bias enters as a function of global positions and the tensors it is computed from
(``ops.position_bias``): each row block's [h, rows, c] bias is computed when needed
(forward) and recomputed and differentiated in the backward, so no [S, S] bias is ever
held, and the gradient of those tensors flows on to the PE's parameters through ordinary
autograd. With document boundaries a pair runs on its parts inside one document
(``ring.document_parts``), the bias at positions within the document.
"""

from __future__ import annotations

import torch

from cope_megatron.ops.context_parallel.ring import (
    ChunkPair,
    ContextParallel,
    Documents,
    Part,
    expanded,
    fold_expanded,
    pair_parts,
)
from cope_megatron.ops.fox import default_flash
from cope_megatron.ops.heads import expand_kv, work_dtype
from cope_megatron.ops.plain_attention import attention_backward, attention_with_lse, merge_softmax
from cope_megatron.ops.position_bias import PositionBias

BLOCK_ELEMENTS = 2**20
"""Logits a biased pair holds at once, [b, h, rows, c]: 4 MiB in fp32, small beside a rank's
q, k, v from a few thousand tokens on."""
PLAIN_BLOCK = 1024
"""Rows and keys per plain-attention call of an unbiased pair's backward: the fused kernel
returns fresh dq, dk and dv for its rows and keys, so a whole pair's would be three more
chunk-sized tensors at once."""


class _PairBias:
    """The bias of a part's row block, at positions within its document (global ones
    without document boundaries), and the causal mask."""

    def __init__(self, cp: ContextParallel, c: int, bias: PositionBias,
                 device: torch.device) -> None:
        self.cp, self.c, self.bias, self.device = cp, c, bias, device

    def positions(self, pair: ChunkPair, part: Part, r0: int, r1: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the part's query rows r0…r1−1 (counted within the part) and of its
        keys."""
        q_pos = self.cp.positions(pair.q_global, self.c, self.device)[part.rows][r0:r1]
        k_pos = self.cp.positions(pair.k_global, self.c, self.device)[part.keys]
        return q_pos - part.start, k_pos - part.start

    def block(self, positions: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[h, rows, keys]: the bias at ``positions``."""
        return self.bias.block(*positions)

    def logits(self, q, k, part: Part, positions: tuple[torch.Tensor, torch.Tensor],
               block: torch.Tensor, scale: float) -> torch.Tensor:
        """The part's scaled, biased and (when causal) masked logits of rows q."""
        logits = scale * (q @ k.transpose(-1, -2)) + block.detach().to(q.dtype)
        if part.causal:
            q_pos, k_pos = positions
            logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        return logits


def _plain_blocks(rows: int, keys: int, causal: bool):
    """(r0, r1, j0, j1, causal) of a part's plain-attention calls, ``PLAIN_BLOCK`` rows and
    keys each; a causal part (a square aligned at the top left) skips the blocks after its
    diagonal, and its diagonal blocks are causal squares themselves."""
    for r0 in range(0, rows, PLAIN_BLOCK):
        r1 = min(rows, r0 + PLAIN_BLOCK)
        for j0 in range(0, r1 if causal else keys, PLAIN_BLOCK):
            yield r0, r1, j0, min(keys, j0 + PLAIN_BLOCK), causal and j0 == r0


def _row_blocks(q: torch.Tensor, keys: int) -> list[tuple[int, int]]:
    """Row ranges of a pair's query chunk q [b, h, c, d] holding ``BLOCK_ELEMENTS`` logits."""
    step = max(1, BLOCK_ELEMENTS // (q.shape[0] * q.shape[1] * keys))
    return [(r0, min(r0 + step, q.shape[2])) for r0 in range(0, q.shape[2], step)]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, scale: float, flash: bool, docs, bias_fn,
                *bias_tensors):
        dtype, work = q.dtype, work_dtype(q.dtype)
        h, c = q.shape[1], q.shape[2] // 2
        # The bias is computed from work-dtype copies of its tensors, here and in the
        # backward's recomputation alike (so that its gradient accumulates in fp32 too).
        bias = None if bias_fn is None else _PairBias(cp, c, PositionBias(
            bias_fn, tuple(t.to(work) for t in bias_tensors)), q.device)
        out = torch.zeros(q.shape, dtype=work, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)

        def visit(owner: int, kv: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t.to(work), h) for t in kv)
            for pair in cp.pairs(owner):
                for part, qi, ki, _ in pair_parts(pair, c, docs):
                    # A part's rows in the working dtype, made when needed: bf16 q is
                    # saved as it came, not as an fp32 copy of the rank's rows.
                    q_c, k_c, v_c, out_c, lse_c = (q[qi].to(work), ke[ki], ve[ki], out[qi],
                                                   lse[qi])
                    if bias is None:
                        merge_softmax(out_c, lse_c, *attention_with_lse(
                            q_c, k_c, v_c, scale, part.causal, flash=flash))
                        continue
                    for r0, r1 in _row_blocks(q_c, k_c.shape[2]):
                        where = bias.positions(pair, part, r0, r1)
                        logits = bias.logits(q_c[:, :, r0:r1], k_c, part, where,
                                             bias.block(where), scale)
                        part_lse = torch.logsumexp(logits, -1)
                        merge_softmax(out_c[:, :, r0:r1], lse_c[:, :, r0:r1],
                                      torch.exp(logits - part_lse[..., None]) @ v_c, part_lse)

        cp.ring([k, v], visit)
        ctx.save_for_backward(q, k, v, out, lse, *bias_tensors)
        ctx.cfg = (cp, scale, flash, dtype, docs, bias_fn)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, *bias_tensors = ctx.saved_tensors
        cp, scale, flash, dtype, docs, bias_fn = ctx.cfg
        work = out.dtype
        h, c = q.shape[1], q.shape[2] // 2
        wants = ctx.needs_input_grad[8:]
        leaves = [t.detach().to(work).requires_grad_(w) for t, w in zip(bias_tensors, wants)]
        bias = None if bias_fn is None else _PairBias(
            cp, c, PositionBias(bias_fn, tuple(leaves)), q.device)
        d_out = d_out.to(work).contiguous()
        delta = (d_out * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        d_bias = [torch.zeros_like(t) if w else None for t, w in zip(leaves, wants)]
        wanted = [t for t, w in zip(leaves, wants) if w]

        def visit(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t.to(work), h) for t in kv)
            dke, dve = grads = expanded(acc, h)
            for pair in cp.pairs(owner):
                for part, qi, ki, _ in pair_parts(pair, c, docs):
                    q_c, do_c, dq_c, lse_c = q[qi].to(work), d_out[qi], dq[qi], lse[qi]
                    k_c, v_c, dk_c, dv_c = ke[ki], ve[ki], dke[ki], dve[ki]
                    if bias is None:
                        out_c = out[qi]
                        for r0, r1, j0, j1, causal in _plain_blocks(
                                q_c.shape[2], k_c.shape[2], part.causal):
                            rows, keys = slice(r0, r1), slice(j0, j1)
                            block_grads = attention_backward(
                                do_c[:, :, rows], q_c[:, :, rows], k_c[:, :, keys],
                                v_c[:, :, keys], out_c[:, :, rows], lse_c[:, :, rows], scale,
                                causal, flash=flash)
                            for g, at, grad in zip((dq_c, dk_c, dv_c), (rows, keys, keys),
                                                   block_grads):
                                g[:, :, at] += grad
                            del block_grads, grad  # not alive while the next block's are made
                        continue
                    for r0, r1 in _row_blocks(q_c, k_c.shape[2]):
                        where = bias.positions(pair, part, r0, r1)
                        with torch.enable_grad():
                            block = bias.block(where)
                        q_b, do_b = q_c[:, :, r0:r1], do_c[:, :, r0:r1]
                        probs = torch.exp(bias.logits(q_b, k_c, part, where, block, scale)
                                          - lse_c[:, :, r0:r1, None])
                        dv_c += probs.transpose(-1, -2) @ do_b
                        d_logits = probs * (do_b @ v_c.transpose(-1, -2)
                                            - delta[qi][:, :, r0:r1, None])
                        dq_c[:, :, r0:r1] += scale * (d_logits @ k_c)
                        dk_c += scale * (d_logits.transpose(-1, -2) @ q_b)
                        if wanted:
                            _accumulate(d_bias, wanted, block, d_logits.sum(0))
            fold_expanded(acc, grads)

        dk, dv = cp.ring_backward([k, v], visit, work)
        return (dq.to(dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None,
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
                   softmax_scale: float, bias: PositionBias | None = None,
                   flash: bool | None = None, starts: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Causal softmax attention over a sequence split across ``cp``'s ranks (head-tail).

    q [b, h, 2c, d]; k, v [b, g, 2c, d]: this rank's two chunks, concatenated;
    ``bias``: the logit bias of this rank's heads at global positions, or None.
    ``flash``: unbiased pairs on the CPU's fused flash kernel (None: on CPU; False: the
    row-blocked matrix products other devices run, e.g. to test them on a CPU).
    ``starts``: each token's document start, [b, S] (``model.documents``): attention stays
    within documents, and the bias is read at positions within them.
    """
    flash, docs = default_flash(q.device, flash), Documents.of(starts)
    if bias is None:
        return _RingAttention.apply(q, k, v, cp, softmax_scale, flash, docs, None)
    return _RingAttention.apply(q, k, v, cp, softmax_scale, flash, docs, bias.fn,
                                *bias.tensors)
