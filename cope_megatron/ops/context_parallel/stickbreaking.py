"""Stick-breaking attention with the sequence split over context-parallel ranks, exactly.

The structure is CoPE's (``ops.context_parallel.cope``): a per-row running sum from the
diagonal back, whose adjoint is a forward sum that crosses chunks the other way. For query
chunk Q and key chunk K ≤ Q, with sp = softplus(z) = −log(1 − β):
Forward
  1. Totals: G[Q, K]_i = Σ_{j ∈ K, j < i} sp_ij, one number per row and pair. The diagonal
     pairs need no carry, so their step 3 runs first and gives theirs; then a ring of K,
     nearest key chunk first, sums the rest for the rows whose sticks nearer chunks have
     not yet spent (Σ sp past ``tiles.spent``: every farther weight is 0), in key tiles from the
     nearest back, a row block stopping once all its rows are spent.
  2. Carries: C[Q, K] = Σ_{K < K' ≤ Q} G[Q, K'], the log-survival of the row over every
     nearer chunk; within a pair log A_ij = z − sp − (in-pair running sum) − C, so each
     pair is the single-rank pair walk with an offset (``ops.stickbreaking_tiles``).
  3. Weighted sums (ring of K, V): no softmax, so pairs' Σ A·v and Σ A simply add; the
     remainder 1 − Σ A then weights the row's own value. Row blocks spent on arrival are
     skipped, the others stop where they are spent, and record how far they went.
Backward (dL = A ⊙ dA, dz_it = dL_it (1 − β_it) − β_it Σ_{j<t} dL_ij)
  4. Loss sums (ring of K, V): each off-diagonal pair's Σ_j dL_ij per row, over the keys
     step 3 visited, by its forward again; F[Q, K] = the sum over chunk K and every farther
     one, a prefix over key chunks; for the diagonal pair, the row's sum over all its keys,
     dO_i·(out_i − v_i).
  5. Pairs (ring of K, V, dK and dV travelling home): the block backward, each row block
     starting from F, so that Σ_{j<t} dL also counts the farther chunks' keys: dq, dk, dv
     exactly, over the keys step 3 visited. Step 4's forward is the price of knowing F
     before any pair runs: the ring brings the farther chunks in no fixed order.
Saved: local q, k, v, the output, the row masses Σ A and the carries; no [c, c] tensor.
With document boundaries every step runs on each pair's parts inside one document
(``ring.document_parts``): keys of other documents add nothing to totals, carries, weights
or loss sums, so a row's stick breaks only on its own document's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cope_megatron.ops import stickbreaking as sb
from cope_megatron.ops import stickbreaking_tiles as tiles
from cope_megatron.ops.context_parallel.ring import (
    ChunkPair,
    ContextParallel,
    Documents,
    expanded,
    fold_expanded,
    pair_parts,
    part_key,
    rows,
)
from cope_megatron.ops.cope.paths import Band
from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype


def _softplus_sums(q, k, seen, *, scale: float) -> torch.Tensor:
    """Step 1 for one off-diagonal pair: Σ_j softplus(scale·q_i·k_j) per row [b, h, sq],
    given ``seen``, the row's sums over nearer chunks known so far: exact while seen plus
    it stays below ``tiles.spent``, past the limit otherwise. Rows already past it are skipped,
    and a row block stops going back through the keys (``tiles.key_tiles``) once all its rows
    pass it: their weights from here back are 0, whatever the sums."""
    work = seen.dtype
    limit = tiles.spent(work)
    total = torch.zeros_like(seen)
    keys = k.shape[2]
    for r0, r1 in tiles.pair_blocks(q, k):
        run = seen[:, :, r0:r1]
        if bool((run > limit).all()):
            continue
        q_blk = q[:, :, r0:r1].to(work)
        for t0, t1 in tiles.key_tiles(slice(0, keys)):  # nearest first: keys − t1 … keys − t0 − 1
            k_tile = k[:, :, keys - t1:keys - t0].to(work)
            run = run + F.softplus(scale * (q_blk @ k_tile.transpose(-1, -2))).sum(-1)
            if bool((run > limit).all()):
                break
        total[:, :, r0:r1] = run - seen[:, :, r0:r1]
    return total


class _StickBreakingContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, scale: float, blocks: Band | None,
                docs: Documents | None):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.detach(), k.detach(), v.detach()  # bf16 stays bf16: blocks convert
        h, c = q.shape[1], q.shape[2] // 2
        totals = torch.zeros(2, 2 * cp.size, *q.shape[:2], c, dtype=work, device=q.device)
        carries = torch.zeros_like(totals)
        acc = torch.zeros(q.shape, dtype=work, device=q.device)
        mass = torch.zeros(q.shape[:3], dtype=work, device=q.device)
        used: dict[tuple, list[int]] = {}  # per pair part: each row block's keys visited

        def attend(pairs: list[ChunkPair], kv: list[torch.Tensor]) -> None:
            """Step 3 for ``pairs``; a diagonal pair's carry past it is its total (step 1)."""
            ke, ve = (expand_kv(t, h) for t in kv)
            for pair in pairs:
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    part_acc, part_mass, past = tiles.chunk_forward(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li],
                        scale=scale, causal=part.causal, blocks=blocks,
                        used=used.setdefault(part_key(pair, part, li[0]), []))
                    acc[qi].add_(part_acc)
                    mass[qi].add_(part_mass)
                    if pair.diagonal:  # past the limit it only says "spent": kept finite,
                        # so that carries, differences of its sums, stay defined
                        totals[pair.q, pair.k_global][li] = past.clamp(max=2 * tiles.spent(work))

        # The diagonal pairs need no carry and give their totals, which leave most rows'
        # sticks spent before any other chunk; so they run first, as CoPE's do.
        first = [p for p in cp.pairs(cp.rank) if p.diagonal]
        attend(first, [k, v])

        def total_pass(owner: int, kv: list[torch.Tensor]) -> None:
            ke = expand_kv(kv[0], h)
            # Nearest key chunk first: its totals spend most sticks of the farther ones.
            for pair in sorted(cp.pairs(owner), key=lambda p: -p.k_global):
                if pair.diagonal:
                    continue
                seen = totals[pair.q, pair.k_global + 1:].sum(0)
                for _, qi, ki, li in pair_parts(pair, c, docs):
                    totals[pair.q, pair.k_global][li] = _softplus_sums(
                        q[qi], ke[ki], seen[li], scale=scale)

        cp.ring([k], total_pass)
        # C[Q, K] = Σ_{K < K' ≤ Q} G: a reverse exclusive cumulative sum over key chunks,
        # zero past each query chunk's own (those totals are zero).
        carries = totals.flip(1).cumsum(1).flip(1) - totals
        cp.ring([k, v], lambda owner, kv: attend([p for p in cp.pairs(owner)
                                                  if not p.diagonal], kv))
        out = sb.with_remainder(acc, mass, expand_kv(v, h))
        ctx.save_for_backward(q, k, v, mass, carries, out)
        ctx.cfg = (cp, scale, blocks, dtype, docs, used)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, mass, carries, out = ctx.saved_tensors
        cp, scale, blocks, dtype, docs, used = ctx.cfg
        h, kv_heads, c = q.shape[1], k.shape[1], q.shape[2] // 2
        work = mass.dtype
        d_out = d_out.to(work).contiguous()
        self_dot, row_total = sb.loss_sums(d_out, out, expand_kv(v, h))
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        loss_sums = torch.zeros_like(carries)

        def sum_pass(owner: int, kv: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t, h) for t in kv)
            for pair in (p for p in cp.pairs(owner) if not p.diagonal):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    loss_sums[pair.q, pair.k_global][li] = tiles.chunk_loss_sums(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li], d_out[qi],
                        self_dot[qi], scale=scale, causal=part.causal, blocks=blocks,
                        used=used[part_key(pair, part, li[0])])

        cp.ring([k, v], sum_pass)
        farther = loss_sums.cumsum(1)  # F[Q, K] = Σ over chunk K and every farther one
        # The diagonal pairs' F is each row's sum over all its keys, which its output gives
        # (as in the single-rank op), so step 4 spares them.
        for qi, qg in enumerate(cp.chunks(cp.rank)):
            farther[qi, qg] = rows(row_total, qi, c)

        def pair_pass(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t, h) for t in kv)
            dke, dve = grads = expanded(acc, h)
            for pair in cp.pairs(owner):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    tiles.chunk_backward(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li], d_out[qi],
                        self_dot[qi], farther[pair.q, pair.k_global][li],
                        (dq[qi], dke[ki], dve[ki]), scale=scale, causal=part.causal,
                        blocks=blocks, used=used[part_key(pair, part, li[0])])
            fold_expanded(acc, grads)

        dk, dv = cp.ring_backward([k, v], pair_pass, work)
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
    sb.check_inputs(q, k, v)
    return _StickBreakingContextParallel.apply(q, k, v, cp, softmax_scale, blocks,
                                               Documents.of(starts))
