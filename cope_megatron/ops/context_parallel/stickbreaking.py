"""Stick-breaking attention with the sequence split over context-parallel ranks, exactly.

The structure is CoPE's (``ops.context_parallel.cope``): a per-row running sum from the
diagonal back, whose adjoint is a forward sum that crosses chunks the other way. For query
chunk Q and key chunk K ≤ Q, with sp = softplus(z) = −log(1 − β):
Forward
  1. Totals: G[Q, K]_i = Σ_{j ∈ K, j < i} sp_ij, one number per row and pair. The diagonal
     pairs need no carry, so their step 3 runs first and gives theirs; then a ring of K,
     nearest key chunk first, sums the rest for the rows whose sticks nearer chunks have
     not yet spent (Σ sp past ``sb.spent``: every farther weight is 0), in key tiles from the
     nearest back, a row block stopping once all its rows are spent.
  2. Carries: C[Q, K] = Σ_{K < K' ≤ Q} G[Q, K'], the log-survival of the row over every
     nearer chunk; within a pair log A_ij = z − sp − (in-pair running sum) − C, so each
     pair is the single-rank block math with an offset (``ops.stickbreaking``).
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

BLOCK_ELEMENTS = 2**20
"""Logits per block of query rows (all heads and batch), so working memory stays O(s)..."""
HEAD_ELEMENTS = 2**16
"""...but at least this many per batch row and head, as the single-rank op's 256 × 256
tiles: with 8 batch rows × 16 heads, blocks of 16 rows ran the pairs 2× slower than blocks
sized so (1k tokens, CPU)."""
MIN_ROWS = 16


def row_blocks(batch_heads: int, n_rows: int, keys: int):
    """Blocks of query rows whose logits against ``keys`` keys fit ``BLOCK_ELEMENTS`` (or
    ``HEAD_ELEMENTS`` per batch row and head), at most ``sb.TILE_ROWS`` (a block stops
    going back through the keys only once all its rows are spent)."""
    step = min(sb.TILE_ROWS, max(MIN_ROWS, BLOCK_ELEMENTS // max(1, batch_heads * keys),
                                 HEAD_ELEMENTS // max(1, keys)))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


class _Reversed:
    """A chunk's keys nearest-first, and each row block's window of them: causal rows
    r0…r1−1 see keys 0…r1−2 (j < i), of which the nearest r1 − 1 − r0 may be after a row;
    otherwise every row sees every key."""

    def __init__(self, keys: int, causal: bool, device: torch.device) -> None:
        self.keys, self.causal, self.device = keys, causal, device

    def take(self, t: torch.Tensor, window: slice, dtype: torch.dtype) -> torch.Tensor:
        """t's keys [b, h, keys, d] in ``window`` of the reversed order, nearest first: a
        copy of the window only, never of the whole chunk."""
        return t[:, :, self.keys - window.stop:self.keys - window.start].flip(2).to(dtype)

    def add(self, t: torch.Tensor, window: slice, grad: torch.Tensor) -> None:
        """Adds ``grad`` (nearest first, over ``window``) into t's keys."""
        t[:, :, self.keys - window.stop:self.keys - window.start] += grad.flip(2)

    def window(self, r0: int, r1: int) -> tuple[slice, torch.Tensor | None]:
        """(slice of the reversed keys, drop mask [B, M]); an empty slice: no keys."""
        if not self.causal:
            return slice(0, self.keys), None
        end = r1 - 1  # keys 0…end−1
        near = torch.arange(end - 1, r0 - 1, -1, device=self.device)  # keys end−1 … r0
        row_ids = torch.arange(r0, r1, device=self.device)
        return slice(self.keys - end, self.keys), near[None, :] >= row_ids[:, None]


def key_tiles(keys: slice):
    """A window's keys (nearest first) in tiles: ``sb.TILE`` keys, then each twice the last up
    to 4·``sb.TILE``, so that a row block that stops early stops near the diagonal, one whose
    sticks reach far back takes few calls, and no buffer grows with the chunk."""
    t0, size = keys.start, sb.TILE
    while t0 < keys.stop:
        t1 = min(keys.stop, t0 + size)
        yield t0, t1
        t0, size = t1, min(2 * size, 4 * sb.TILE)


def _blocks(q: torch.Tensor, k: torch.Tensor):
    """Row blocks of a chunk pair, sized for its widest key tile."""
    return row_blocks(q.shape[0] * q.shape[1], q.shape[2], min(k.shape[2], 4 * sb.TILE))


def _drop_part(drop: torch.Tensor | None, keys: slice, t0: int, t1: int):
    """The part of a window's drop mask (over its first M keys) in tile t0…t1−1, or None."""
    if drop is None or t0 - keys.start >= drop.shape[-1]:
        return None
    return drop[:, t0 - keys.start:t1 - keys.start]


def chunk_forward(q, k, v, carry, *, scale: float, causal: bool, blocks: Band | None = None,
                  used: list[int] | None = None):
    """(Σ_j A_ij v_j [b, h, sq, d], Σ_j A_ij [b, h, sq], the carry past the chunk) of query
    rows over one key chunk: q [b, h, sq, d]; k, v [b, h, sk, d] (expanded); carry
    [b, h, sq], Σ sp over the rows' keys nearer than the chunk. ``causal``: the rows' own
    chunk (key j is row i's if j < i); otherwise every key is before every row. A row block
    takes the keys in ``key_tiles`` and stops once every row's carry is past ``sb.spent``
    (every farther weight is 0), so a block whose rows arrive past it costs nothing; the
    carry returned is exact below the limit and past it otherwise. ``used``: a list to
    append each row block's keys visited to, for ``chunk_loss_sums`` and ``chunk_backward``."""
    fwd, _ = sb.block_functions(sb.block_code(q.device, k.shape[2], blocks))
    work, limit = carry.dtype, sb.spent(carry.dtype)
    order = _Reversed(k.shape[2], causal, q.device)
    acc = torch.zeros(q.shape, dtype=work, device=q.device)
    mass = torch.zeros(q.shape[:3], dtype=work, device=q.device)
    past = carry.clone()
    for r0, r1 in _blocks(q, k):
        keys, drop = order.window(r0, r1)
        run, visited = carry[:, :, r0:r1], 0
        if not bool((run > limit).all()):
            q_blk = q[:, :, r0:r1].to(work)
            for t0, t1 in key_tiles(keys):
                tile = slice(t0, t1)
                a, m, run = fwd(q_blk, order.take(k, tile, work), order.take(v, tile, work),
                                _drop_part(drop, keys, t0, t1), run, scale)
                acc[:, :, r0:r1] += a
                mass[:, :, r0:r1] += m
                visited = t1 - keys.start
                if bool((run > limit).all()):
                    break
            past[:, :, r0:r1] = run
        if used is not None:
            used.append(visited)
    return acc, mass, past


def _visited_tiles(q, k, causal: bool, used: list[int]):
    """Per row block of a pair: (r0, r1, its tiles as (reversed-key slice, drop part)) over
    the keys ``chunk_forward`` visited (``used``). Keys past them have no weight and no
    gradient."""
    order = _Reversed(k.shape[2], causal, q.device)
    for (r0, r1), visited in zip(_blocks(q, k), used, strict=True):
        keys, drop = order.window(r0, r1)
        yield r0, r1, [(slice(t0, t1), _drop_part(drop, keys, t0, t1))
                       for t0, t1 in key_tiles(slice(keys.start, keys.start + visited))]


def chunk_loss_sums(q, k, v, carry, d_out, self_dot, *, scale: float, causal: bool,
                    used: list[int], blocks: Band | None = None) -> torch.Tensor:
    """Each row's Σ_j dL_ij [b, h, sq] over the keys one ``chunk_forward`` visited, by that
    forward again: Σ_j dL_ij = dO_i·Σ_j A_ij v_j − (Σ_j A_ij) dO_i·v_i. ``self_dot``:
    dO_i·v_i [b, h, sq]."""
    fwd, _ = sb.block_functions(sb.block_code(q.device, k.shape[2], blocks))
    work = carry.dtype
    order = _Reversed(k.shape[2], causal, q.device)
    sums = torch.zeros_like(carry)
    for r0, r1, tiles in _visited_tiles(q, k, causal, used):
        q_blk, do_blk, dot_blk = (t[:, :, r0:r1].to(work) for t in (q, d_out, self_dot))
        run = carry[:, :, r0:r1]
        for tile, part in tiles:
            a, m, run = fwd(q_blk, order.take(k, tile, work), order.take(v, tile, work),
                            part, run, scale)
            sums[:, :, r0:r1] += (do_blk * a).sum(-1) - m * dot_blk
    return sums


def chunk_backward(q, k, v, carry, d_out, self_dot, farther, grads, *, scale: float,
                   causal: bool, used: list[int], blocks: Band | None = None) -> None:
    """Adds one ``chunk_forward``'s (dq, dk, dv) into ``grads`` (dk, dv over the expanded
    heads), recomputing the tiles it visited (``used``). ``farther`` [b, h, sq]: each
    row's Σ dL over this chunk's keys and every farther chunk's (``chunk_loss_sums``), from
    which each tile's Σ_{j≤t} dL follows as the tiles go back: dz_it = dL_it − β_it ·
    Σ_{j≤t} dL_ij is then exact, whatever chunks lie beyond."""
    dq, dk, dv = grads
    _, bwd = sb.block_functions(sb.block_code(q.device, k.shape[2], blocks))
    work = carry.dtype
    order = _Reversed(k.shape[2], causal, q.device)
    for r0, r1, tiles in _visited_tiles(q, k, causal, used):
        q_blk, do_blk, dot_blk = (t[:, :, r0:r1].to(work) for t in (q, d_out, self_dot))
        run, far = carry[:, :, r0:r1], farther[:, :, r0:r1]
        for tile, part in tiles:
            dq_b, dk_t, dv_t, tile_sum, run = bwd(
                q_blk, order.take(k, tile, work), order.take(v, tile, work), part, run,
                do_blk, dot_blk, scale, far)
            far = far - tile_sum
            dq[:, :, r0:r1] += dq_b
            order.add(dk, tile, dk_t)
            order.add(dv, tile, dv_t)


def _softplus_sums(q, k, seen, *, scale: float) -> torch.Tensor:
    """Step 1 for one off-diagonal pair: Σ_j softplus(scale·q_i·k_j) per row [b, h, sq],
    given ``seen``, the row's sums over nearer chunks known so far: exact while seen plus
    it stays below ``sb.spent``, past the limit otherwise. Rows already past it are skipped,
    and a row block stops going back through the keys (``key_tiles``) once all its rows
    pass it: their weights from here back are 0, whatever the sums."""
    work = seen.dtype
    limit = sb.spent(work)
    total = torch.zeros_like(seen)
    keys = k.shape[2]
    for r0, r1 in _blocks(q, k):
        run = seen[:, :, r0:r1]
        if bool((run > limit).all()):
            continue
        q_blk = q[:, :, r0:r1].to(work)
        for t0, t1 in key_tiles(slice(0, keys)):  # nearest first: keys − t1 … keys − t0 − 1
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
                    part_acc, part_mass, past = chunk_forward(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li],
                        scale=scale, causal=part.causal, blocks=blocks,
                        used=used.setdefault(part_key(pair, part, li[0]), []))
                    acc[qi].add_(part_acc)
                    mass[qi].add_(part_mass)
                    if pair.diagonal:  # past the limit it only says "spent": kept finite,
                        # so that carries, differences of its sums, stay defined
                        totals[pair.q, pair.k_global][li] = past.clamp(max=2 * sb.spent(work))

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
        self_dot = (d_out * expand_kv(v, h)).sum(-1)
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        loss_sums = torch.zeros_like(carries)

        def sum_pass(owner: int, kv: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t, h) for t in kv)
            for pair in (p for p in cp.pairs(owner) if not p.diagonal):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    loss_sums[pair.q, pair.k_global][li] = chunk_loss_sums(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li], d_out[qi],
                        self_dot[qi], scale=scale, causal=part.causal, blocks=blocks,
                        used=used[part_key(pair, part, li[0])])

        cp.ring([k, v], sum_pass)
        farther = loss_sums.cumsum(1)  # F[Q, K] = Σ over chunk K and every farther one
        # The diagonal pairs' F is each row's sum over all its keys, which its output gives
        # (as in the single-rank op), so step 4 spares them: Σ_j dL_ij = dO_i·(out_i − v_i).
        row_total = (d_out * out).sum(-1) - self_dot
        for qi, qg in enumerate(cp.chunks(cp.rank)):
            farther[qi, qg] = rows(row_total, qi, c)

        def pair_pass(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
            ke, ve = (expand_kv(t, h) for t in kv)
            dke, dve = grads = expanded(acc, h)
            for pair in cp.pairs(owner):
                for part, qi, ki, li in pair_parts(pair, c, docs):
                    chunk_backward(
                        q[qi], ke[ki], ve[ki], carries[pair.q, pair.k_global][li], d_out[qi],
                        self_dot[qi], farther[pair.q, pair.k_global][li],
                        (dq[qi], dke[ki], dve[ki]), scale=scale, causal=part.causal,
                        blocks=blocks, used=used[part_key(pair, part, li[0])])
            fold_expanded(acc, grads)

        dk, dv = cp.ring([k, v], pair_pass, [torch.zeros(t.shape, dtype=work, device=t.device)
                                             for t in (k, v)])
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
