"""Stick-breaking attention with the sequence split over context-parallel ranks, exactly.

The structure is CoPE's (``ops.context_parallel.cope``): a per-row running sum from the
diagonal back, whose adjoint is a forward sum that crosses chunks the other way. For query
chunk Q and key chunk K ≤ Q, with sp = softplus(z) = −log(1 − β):
Forward
  1. Totals (ring of K): G[Q, K]_i = Σ_{j ∈ K, j < i} sp_ij, one number per row and pair.
  2. Carries: C[Q, K] = Σ_{K < K' ≤ Q} G[Q, K'], the log-survival of the row over every
     nearer chunk; within a pair log A_ij = z − sp − (in-pair running sum) − C, so each
     pair is the single-rank block math with an offset (``ops.stickbreaking``).
  3. Weighted sums (ring of K, V): no softmax, so pairs' Σ A·v and Σ A simply add; the
     remainder 1 − Σ A then weights the row's own value.
Backward (dL = A ⊙ dA, dz_it = dL_it (1 − β_it) − β_it Σ_{j<t} dL_ij)
  4. Pairs (ring of K, V, dK and dV travelling home): the block backward with the in-pair
     part of Σ_{j<t} dL gives dq, dk, dv and each row's Σ dL over the pair.
  5. Correction (ring of K, dK home): B[Q, K] = Σ_{K' < K} Σ dL (the farther chunks) adds
     dz_it = −β_it · B_i. Unlike CoPE's clamped positions, every row has B ≠ 0 here, so the
     pass is not skipped; it costs one q·k product and a sigmoid per pair.
Saved: local q, k, v, the row masses Σ A and the carries; no [c, c] tensor.
With document boundaries every step runs on each pair's parts inside one document
(``ring.document_parts``): keys of other documents add nothing to totals, carries, weights
or the correction, so a row's stick breaks only on its own document's keys.
"""

from __future__ import annotations

import torch

from cope_megatron.ops.context_parallel.ring import (
    ContextParallel,
    Documents,
    expanded,
    fold_expanded,
    pair_parts,
)
from cope_megatron.ops.cope.paths import Band
from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype
from cope_megatron.ops.stickbreaking import (
    check_inputs,
    chunk_backward,
    chunk_correction,
    chunk_forward,
    row_blocks,
    with_remainder,
)


def _softplus_sums(q, k, *, scale: float, causal: bool) -> torch.Tensor:
    """Step 1 for one pair: Σ_{j<i} softplus(scale·q_i·k_j) per row, in row blocks."""
    work = work_dtype(q.dtype)
    total = torch.zeros(q.shape[:3], dtype=work, device=q.device)
    k = k.to(work)
    for r0, r1 in row_blocks(q.shape[0] * q.shape[1], q.shape[2], k.shape[2]):
        sp = torch.nn.functional.softplus(scale * (q[:, :, r0:r1].to(work) @ k.transpose(-1, -2)))
        if causal:
            i = torch.arange(r0, r1, device=q.device)[:, None]
            sp = sp.masked_fill(torch.arange(k.shape[2], device=q.device) >= i, 0.0)
        total[:, :, r0:r1] = sp.sum(-1)
    return total


class _StickBreakingContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, scale: float, blocks: Band | None,
                docs: Documents | None):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.detach(), k.detach(), v.detach()  # bf16 stays bf16: blocks convert
        h, c = q.shape[1], q.shape[2] // 2
        totals = torch.zeros(2, 2 * cp.size, *q.shape[:2], c, dtype=work, device=q.device)

        def total_pass(owner: int, kv: list[torch.Tensor]) -> None:
            ke = expand_kv(kv[0], h)
            for pair in cp.pairs(owner):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    totals[pair.q, pair.k_global][li] = _softplus_sums(
                        q[qi], ke[ki], scale=scale, causal=part.causal)

        cp.ring([k], total_pass)
        # C[Q, K] = Σ_{K < K' ≤ Q} G: a reverse exclusive cumulative sum over key chunks,
        # zero past each query chunk's own (those totals are zero).
        carries = totals.flip(1).cumsum(1).flip(1) - totals
        acc = torch.zeros(q.shape, dtype=work, device=q.device)
        mass = torch.zeros(q.shape[:3], dtype=work, device=q.device)

        def attention_pass(owner: int, kv: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t, h) for t in kv)
            for pair in cp.pairs(owner):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    part_acc, part_mass = chunk_forward(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li],
                        scale=scale, causal=part.causal, blocks=blocks)
                    acc[qi].add_(part_acc)
                    mass[qi].add_(part_mass)

        cp.ring([k, v], attention_pass)
        ctx.save_for_backward(q, k, v, mass, carries)
        ctx.cfg = (cp, scale, blocks, dtype, docs)
        return with_remainder(acc, mass, expand_kv(v, h)).to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, mass, carries = ctx.saved_tensors
        cp, scale, blocks, dtype, docs = ctx.cfg
        h, kv_heads, c = q.shape[1], k.shape[1], q.shape[2] // 2
        work = mass.dtype
        d_out = d_out.to(work).contiguous()
        self_dot = (d_out * expand_kv(v, h)).sum(-1)
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        d_l_sums = torch.zeros_like(carries)

        def pair_pass(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t, h) for t in kv)
            dke, dve = grads = expanded(acc, h)
            for pair in cp.pairs(owner):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    d_l_sums[pair.q, pair.k_global][li] = chunk_backward(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li], d_out[qi],
                        self_dot[qi], (dq[qi], dke[ki], dve[ki]), scale=scale,
                        causal=part.causal, blocks=blocks)
            fold_expanded(acc, grads)

        kv_grads = cp.ring([k, v], pair_pass, [torch.zeros(t.shape, dtype=work, device=t.device)
                                               for t in (k, v)])
        dv = kv_grads.pop()
        farther = d_l_sums.cumsum(1) - d_l_sums  # B[Q, K] = Σ_{K' < K}

        def correction_pass(owner: int, kv: list[torch.Tensor],
                            acc: list[torch.Tensor]) -> None:
            ke = expand_kv(kv[0], h)
            (dke,) = grads = expanded(acc, h)
            for pair in cp.pairs(owner):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    chunk_correction(q[qi], ke[ki], farther[pair.q, pair.k_global][li],
                                     (dq[qi], dke[ki]), scale=scale, causal=part.causal)
            fold_expanded(acc, grads)

        (dk,) = cp.ring([k], correction_pass, kv_grads)  # comes back with the B terms
        # The remainder's own value: d v_i += (1 − Σ_j A_ij) dO_i.
        dv = dv + reduce_kv_heads((1 - mass)[..., None] * d_out, kv_heads)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None


def stickbreaking_attention_context_parallel(q: torch.Tensor, k: torch.Tensor,
                                             v: torch.Tensor, cp: ContextParallel, *,
                                             softmax_scale: float,
                                             blocks: Band | None = None,
                                             starts: torch.Tensor | None = None
                                             ) -> torch.Tensor:
    """Causal stick-breaking attention over a sequence split across ``cp``'s ranks
    (head-tail layout). q [b, h, 2c, d]; k, v [b, g, 2c, d]: this rank's two chunks,
    concatenated. ``starts``: each token's document start [b, S] (``model.documents``):
    attention stays within documents. Returns this rank's rows of the single-rank output."""
    check_inputs(q, k, v)
    return _StickBreakingContextParallel.apply(q, k, v, cp, softmax_scale, blocks,
                                               Documents.of(starts))
