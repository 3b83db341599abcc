"""CoPE attention with the sequence split over context-parallel ranks, exactly.

No public system has this: TransformerEngine's CP attention knows plain softmax only, and
CoPE's positions do not decompose over key chunks the way softmax does. For query i and key
j ≤ i, p_ij = min(Σ_{t=j..i} σ(a_it), npos_max − 1) sums gates over every key between j and
i, and those keys may live on other ranks. The layout and the ring are
``ops.context_parallel.ring``; chunks are Q (queries) and K (keys), in global order.

Forward
  1. Gate totals (ring of K). For every causal pair (Q, K ≤ Q): G[Q, K]_i = Σ_{j ∈ K, j ≤ i}
     σ(a_ij). A row's totals per chunk are few numbers, so any arrival order will do. Once
     the chunks between K and Q seen so far sum to npos_max − 1 for a row, every position
     from K back clamps whatever G is, so the row is skipped. The diagonal pairs need no
     carry, so with the chunked pair code their step 3 runs first and its bands give their
     totals (``chunk_forward(totals=)``); after them usually only rows next to a chunk
     start are left to compute.
  2. Carries: C[Q, K] = Σ_{K < K' ≤ Q} G[Q, K'], the gate total of the row's keys after
     chunk K. Within a pair p_ij = C + (reverse cumsum of the pair's gates), so each pair is
     the single-rank block math with an offset (``ops.cope.chunked.chunk_forward``, or the
     Triton kernels with ``impl="triton"``).
  3. Attention (ring of K, V): each pair's softmax over its keys gives (out, lse); partial
     results merge by log-sum-exp. Saved: local q, k, v, E, out, lse and the carries.
Backward (a = logits, g = σ(a), dp = the gradient reaching positions)
  dL/da_ij gets g'_ij · Σ_{t ≤ j} dp_it: the adjoint of a reverse cumsum is a forward cumsum,
  which crosses chunks the other way. Split it as the in-pair cumsum plus
  B[Q, K]_i = Σ_{K' < K} Σ_{t ∈ K'} dp_it.
  4. Pairs (ring of K, V, with dK, dV travelling home behind them): the single-rank block
     backward with carry C and B = 0 gives dq, dk, dv, the table's dz and each row's Σ dp
     over the pair.
  5. Correction (K and dK, a ring only when needed): the B term is linear in B, so it adds
     dq_i += s·Σ_j B_i g'_ij k_j and dk_j += s·Σ_i B_i g'_ij q_i, only for rows with B ≠ 0.
     Positions clamp at npos_max − 1, and p grows towards far keys, so dp is 0 beyond the
     first clamped key: B ≠ 0 only for rows whose unclamped keys cross into an earlier
     chunk, usually a few rows next to a chunk border, whose keys in their own chunk are
     the rank's. Rows with B = 0 are skipped exactly; the rank's own keys' terms are added
     without an exchange, and the ring runs only when some rank has a row with B ≠ 0
     against another rank's keys (sparse gates, or chunks shorter than the clamp).
  6. The table: dq += dz·Eᵀ, dE = qᵀ·dz, within step 4 from each query chunk's dz over
     the pairs of one ring step (z = q·E is likewise made per query chunk and step). Where
     nearer chunks' gates clamp every row of a step's pairs (all but the key chunk next to
     the rows', usually), they are plain attention plus z's last column: only that column
     is computed, and there is no dz.
Dtypes: bf16 q, k, v stay bf16 (saved, exchanged and passed to the chunked pair code, which
converts each band and plain-attention call's part); gate totals, carries, out, lse and all
gradients accumulate in fp32 (``work_dtype``), dK and dV travelling home in fp32 too.
Memory per rank: local q, k, v, out, lse and dq; the visited rank's K, V and the next one's
in flight; one set of dK, dV accumulators (the ring adds into the received sum); z and dz
of one query chunk. No [S, S] tensor, no whole-sequence K/V and no whole-rank z, so it falls
as 1/CP (``bench/cp_attention.py``).
Document boundaries: every step runs on each pair's parts inside one document
(``ring.document_parts``), so totals, carries, dp sums and corrections count only the
row's own document, whose first key is where its gate sums stop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cope_megatron.ops.context_parallel.ring import (
    ChunkPair,
    ContextParallel,
    Documents,
    Part,
    expanded,
    fold_expanded,
    pair_parts,
    part_key,
    rows,
)
from cope_megatron.ops.cope import chunked as cope_chunked
from cope_megatron.ops.cope import resolve_impl
from cope_megatron.ops.cope.chunked import table_backward
from cope_megatron.ops.cope.paths import Paths
from cope_megatron.ops.heads import expand_kv, work_dtype
from cope_megatron.ops.plain_attention import merge_softmax

CORRECTION_ELEMENTS = 2**19  # gates [b, h, rows, c] step 5 holds per row block (2 MiB fp32)


def _kernels(impl: str):
    """The module whose chunk_forward/chunk_backward run the pairs."""
    if resolve_impl(impl) == "triton":
        from cope_megatron.ops.cope import triton_kernels as cope_triton
        return cope_triton
    return cope_chunked


def _input_dtype(ops, dtype: torch.dtype) -> torch.dtype:
    """What q, k, v enter the pair code as: the chunked op's converts each part it computes
    on, so bf16 stays bf16; the Triton kernels write partial outputs in q's dtype, which
    would round them before the log-sum-exp merge, so they get ``work_dtype``."""
    return dtype if ops is cope_chunked else work_dtype(dtype)


def _options(ops, widths: dict, pair: ChunkPair, part: Part, batch: slice,
             paths: Paths | None) -> dict:
    """Both pair codes record in the forward, for the backward, where each pair's (part's)
    near band ends (the chunked op its widths, the Triton kernels their plain key blocks
    and gate totals); the chunked op also takes ``paths``."""
    bands = {"bands": widths.setdefault(part_key(pair, part, batch), [])}
    return bands | {"paths": paths} if ops is cope_chunked else bands


def _by_query(pairs: list[ChunkPair]) -> list[tuple[int, list[ChunkPair]]]:
    """A step's pairs grouped by local query chunk, so that a chunk's table product
    z = q·E (and its gradient) is made once per step, [b, h, c, npos], never per rank."""
    return [(qi, [p for p in pairs if p.q == qi]) for qi in sorted({p.q for p in pairs})]


def _all_clamped(ops, carries: torch.Tensor, qi: int, pairs: list[ChunkPair],
                 npos_max: int) -> bool:
    """Whether the chunked pair code finds every row of ``pairs`` (local query chunk
    ``qi``) clamped by the gates of the chunks between (by its own test), so that they are
    plain attention only and no band runs: usually all but the key chunk next to the
    rows'."""
    return ops is cope_chunked and all(
        cope_chunked.all_clamped(carries[qi, pair.k_global], npos_max) for pair in pairs)


def _table_product(q_c: torch.Tensor, pos_emb: torch.Tensor, npos_max: int, clamped: bool
                   ) -> torch.Tensor:
    """z = q·E of a query chunk, [b, h, c, npos]. For ``clamped`` pairs the pair code reads
    z at the last position only (the plain keys' one added logit), so that column alone is
    computed and broadcast: 1/npos of the product."""
    if clamped:
        return (q_c @ pos_emb[..., npos_max - 1:npos_max]).expand(*q_c.shape[:3],
                                                                  pos_emb.shape[-1])
    return q_c @ pos_emb


def _pair_mask(cp: ContextParallel, owners: list[int], device: torch.device) -> torch.Tensor:
    """[2, 2·CP] bool: this rank's causal pairs (local query chunk, global key chunk)
    against ``owners``' key chunks, to select them in per-pair tensors such as the carries
    (entries of other key chunks are not pairs: their prefix sums are not zero)."""
    mask = torch.zeros(2, 2 * cp.size, dtype=torch.bool, device=device)
    for owner in owners:
        for pair in cp.pairs(owner):
            mask[pair.q, pair.k_global] = True
    return mask


def _active_rows(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (dim 2 of [b, h, c]) where ``mask`` holds for any batch or head."""
    return mask.flatten(0, 1).any(0).nonzero().squeeze(1)


def row_gates(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float,
              causal: bool, key_start: int = 0) -> torch.Tensor:
    """Gates σ(a_ij) of the query rows ``rows`` (indices into q's rows) for keys k, the
    keys from ``key_start`` on; zero for keys after the row when ``causal``:
    q [b, h, sq, d], k [b, h, sk, d] -> [b, h, len(rows), sk], in ``work_dtype``."""
    work = work_dtype(q.dtype)
    g = torch.sigmoid(scale * (q[:, :, rows].to(work) @ k.to(work).transpose(-1, -2)))
    if causal:
        cols = torch.arange(key_start, key_start + k.shape[2], device=k.device)
        g = g.masked_fill(cols > rows[:, None], 0.0)
    return g


def gate_sums(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float,
              causal: bool, limit: float, block: int = 128) -> torch.Tensor:
    """Σ_j σ(a_ij) over each selected row's visible keys -> [b, h, len(rows)], exact below
    ``limit`` and at least ``limit`` otherwise. Key blocks are summed from the last one back
    and a row leaves its block's product once it reaches ``limit`` (for every batch and
    head): beyond the clamp a position's exact value does not matter, gates of near keys
    usually get there quickly, and the rows that need farther keys are few."""
    sums = []
    for i in range(0, rows.numel(), block):
        idx = rows[i:i + block]
        keys = int(idx.max()) + 1 if causal else k.shape[2]
        acc = q.new_zeros(*q.shape[:2], idx.numel(), dtype=work_dtype(q.dtype))
        live = torch.arange(idx.numel(), device=q.device)  # rows below the limit
        for j1 in range(keys, 0, -block):
            j0 = max(0, j1 - block)
            acc[:, :, live] += row_gates(q, k[:, :, j0:j1], idx[live], scale=scale,
                                         causal=causal, key_start=j0).sum(-1)
            live = live[(acc[:, :, live] < limit).flatten(0, 1).any(0)]
            if not live.numel():
                break
        sums.append(acc)
    return torch.cat(sums, -1) if sums else q.new_zeros(*q.shape[:2], 0,
                                                        dtype=work_dtype(q.dtype))


def _correction(q, k, dq, dk, b_carry, scale: float, diagonal: bool) -> None:
    """Step 5 for one pair, in place: rows with a nonzero carried Σ dp, in blocks."""
    active = _active_rows(b_carry != 0)
    k_work = k.to(dq.dtype) if active.numel() else k  # no fp32 copy when no row needs it
    step = max(1, CORRECTION_ELEMENTS // (q.shape[0] * q.shape[1] * k.shape[2]))
    for start in range(0, active.numel(), step):
        idx = active[start:start + step]
        keys = int(idx.max()) + 1 if diagonal else k.shape[2]  # causal: keys up to the row
        g = row_gates(q, k[:, :, :keys], idx, scale=scale, causal=diagonal)  # [b, h, n, keys]
        w = (scale * b_carry[:, :, idx, None]) * g * (1 - g)
        dq[:, :, idx] += w @ k_work[:, :, :keys]
        dk[:, :, :keys] += w.transpose(-1, -2) @ q[:, :, idx].to(dq.dtype)


class _CoPEContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, cp: ContextParallel, npos_max: int, scale: float,
                impl: str, paths: Paths | None, docs: Documents | None):
        dtype, work = q.dtype, work_dtype(q.dtype)
        # Document parts off the diagonal are rectangles; the Triton kernels take square
        # pairs, so documents run on the chunked pair code.
        ops = cope_chunked if docs is not None else _kernels(impl)
        given = _input_dtype(ops, dtype)
        q, pos_emb = q.to(given), pos_emb.to(work)
        h, c = q.shape[1], q.shape[2] // 2

        totals: dict[tuple[int, int], torch.Tensor] = {}  # (local q chunk, global K) -> G
        carries = torch.zeros(2, 2 * cp.size, *q.shape[:2], c, dtype=work, device=q.device)
        out = torch.zeros(q.shape, dtype=work, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)
        widths: dict[tuple[int, int], list] = {}  # per pair, its op's record

        def attend(pairs: list[ChunkPair], kv: list[torch.Tensor], with_totals: bool = False
                   ) -> None:
            """Step 3 for ``pairs``; ``with_totals``: their gate totals (step 1) too."""
            ke, ve = (expand_kv(t.to(given), h) for t in kv)
            for qi, group in _by_query(pairs):
                z_c = _table_product(rows(q, qi, c).to(work), pos_emb, npos_max,
                                     _all_clamped(ops, carries, qi, group, npos_max))
                for pair in group:
                    carry = carries[qi, pair.k_global]
                    total = torch.zeros_like(carry) if with_totals else None
                    for part, qr, kr, lr in pair_parts(pair, c, docs):
                        merge_softmax(out[qr], lse[qr], *ops.chunk_forward(
                            q[qr], ke[kr], ve[kr], z_c[lr], carry[lr], scale=scale,
                            npos_max=npos_max, causal=part.causal,
                            **_options(ops, widths, pair, part, lr[0], paths),
                            **({} if total is None else {"totals": total[lr]})))
                    if total is not None:
                        totals[pair.q, pair.k_global] = total
                del z_c  # not alive while the next chunk's is made

        # The diagonal pairs need no carry, so they run first; the chunked op's bands hold
        # every row's keys up to its clamp, so their gate totals come with them, which
        # spares the gate pass its largest part (and clamps most rows of the rest).
        first = [p for p in cp.pairs(cp.rank) if p.diagonal] if ops is cope_chunked else []
        attend(first, [k, v], with_totals=True)

        def gate_pass(owner: int, kv: list[torch.Tensor]) -> None:
            ke = expand_kv(kv[0], h)
            # Nearest key chunk first: its totals clamp most rows of the farther ones.
            for pair in sorted(cp.pairs(owner), key=lambda p: -p.k_global):
                if (pair.q, pair.k_global) in totals:
                    continue
                # A row whose keys in nearer chunks seen so far already reach the last
                # position clamps every key from here back: its total here is not needed.
                total = torch.zeros(*q.shape[:2], c, dtype=work, device=q.device)
                seen = sum((g for (qi, kg), g in totals.items()
                            if qi == pair.q and kg > pair.k_global), total)
                for part, qr, kr, lr in pair_parts(pair, c, docs):
                    active = _active_rows(seen[lr] < npos_max - 1)
                    total[lr][:, :, active] = gate_sums(q[qr], ke[kr], active, scale=scale,
                                                        causal=part.causal,
                                                        limit=npos_max - 1)
                totals[pair.q, pair.k_global] = total

        cp.ring([k], gate_pass)
        for qi, qg in enumerate(cp.chunks(cp.rank)):
            for kg in range(qg - 1, -1, -1):
                carries[qi, kg] = carries[qi, kg + 1] + totals[qi, kg + 1]
        cp.ring([k, v], lambda owner, kv: attend([p for p in cp.pairs(owner)
                                                  if p not in first], kv))
        ctx.save_for_backward(q, k, v, pos_emb, out, lse, carries)
        ctx.cfg = (cp, npos_max, scale, ops, dtype, widths, paths, docs)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse, carries = ctx.saved_tensors
        cp, npos_max, scale, ops, dtype, widths, paths, docs = ctx.cfg
        work, given = pos_emb.dtype, q.dtype
        h, c = q.shape[1], q.shape[2] // 2
        d_out = d_out.to(work).contiguous()
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        d_emb = torch.zeros_like(pos_emb)
        dp_sums = torch.zeros_like(carries)

        def pair_pass(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
            nonlocal d_emb
            ke, ve = (expand_kv(t.to(given), h) for t in kv)
            dke, dve = grads = expanded(acc, h)
            for qi, pairs in _by_query(cp.pairs(owner)):
                q_c = rows(q, qi, c)
                clamped = _all_clamped(ops, carries, qi, pairs, npos_max)
                z_c = _table_product(q_c.to(work), pos_emb, npos_max, clamped)
                # Only bands add to dz: clamped pairs have none, so no dz and no table term.
                dz_c = None if clamped else torch.zeros_like(z_c)
                for pair in pairs:
                    for part, qr, kr, lr in pair_parts(pair, c, docs):
                        dz_part = None if dz_c is None else dz_c[lr]
                        dp_sums[qi, pair.k_global][lr] = ops.chunk_backward(
                            q[qr], ke[kr], ve[kr], z_c[lr], carries[qi, pair.k_global][lr],
                            d_out[qr], out[qr], lse[qr], (dq[qr], dke[kr], dve[kr], dz_part),
                            scale=scale, npos_max=npos_max, causal=part.causal,
                            **_options(ops, widths, pair, part, lr[0], paths))
                if dz_c is not None:
                    # Step 6 per query chunk and step: no whole-rank z or dz is ever held.
                    dq_table, d_emb_c = table_backward(q_c.to(work), pos_emb, dz_c)
                    rows(dq, qi, c).add_(dq_table)
                    d_emb += d_emb_c
                    del dq_table
                del z_c, dz_c  # not alive while the next chunk's are made
            fold_expanded(acc, grads)

        kv_grads = cp.ring_backward([k, v], pair_pass, work)
        dv = kv_grads.pop()

        # B[Q, K] = Σ_{K' < K} dp sums: an exclusive prefix over key chunks.
        b_carry = dp_sums.cumsum(1) - dp_sums

        def correction_pass(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]
                            ) -> None:
            ke = expand_kv(kv[0].to(given), h)
            (dke,) = grads = expanded(acc, h)
            for pair in cp.pairs(owner):
                for part, qr, kr, lr in pair_parts(pair, c, docs):
                    _correction(q[qr], ke[kr], dq[qr], dke[kr],
                                b_carry[pair.q, pair.k_global][lr], scale, part.causal)
            fold_expanded(acc, grads)

        # B is usually nonzero only for rows next to the start of the rank's own chunks,
        # against their own keys (a row's unclamped keys reach one chunk back), so those
        # terms are added here, and the ring of K and dK runs only when some rank has a
        # row with B against another rank's keys.
        if b_carry[_pair_mask(cp, [cp.rank], q.device)].any():
            correction_pass(cp.rank, [k], kv_grads)
        others = _pair_mask(cp, [o for o in range(cp.size) if o != cp.rank], q.device)
        needed = torch.tensor([int(bool(b_carry[others].any()))], device=q.device)
        dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=cp.group)
        if needed.item():
            def remote_pass(owner: int, kv: list[torch.Tensor], acc: list[torch.Tensor]
                            ) -> None:
                if owner != cp.rank:  # the rank's own keys' terms are in already
                    correction_pass(owner, kv, acc)

            # The B terms of the other ranks' rows come home and add to the dK so far,
            # which waits at home beside the sum travelling round: one K-sized buffer more
            # than a ring that sent dK itself, below the pair ring's peak of K, V sets.
            kv_grads = cp.ring_backward([k], remote_pass, work, start=kv_grads)

        (dk,) = kv_grads
        return (dq.to(dtype), dk.to(dtype), dv.to(dtype), d_emb.to(dtype),
                None, None, None, None, None, None)


def cope_attention_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_emb: torch.Tensor,
    cp: ContextParallel,
    *,
    npos_max: int,
    softmax_scale: float,
    impl: str = "auto",
    paths: Paths | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal CoPE over a sequence split across ``cp``'s ranks in the head-tail layout.

    q [b, h, 2c, d]; k, v [b, g, 2c, d]: this rank's two chunks, concatenated;
    pos_emb [h or 1, d, npos]. Returns this rank's rows of the single-rank output.
    ``paths``: the chunked pair code's device-dependent choices (``ops.cope.paths``).
    ``starts``: each token's document start [b, S] (``model.documents``): gates are summed
    and attention runs within documents only.
    """
    if impl == "reference":
        raise ValueError("pe.cope.impl=reference materializes [s, s] logits and cannot be "
                         "split across context-parallel ranks; use auto, chunked or triton")
    if paths is not None and resolve_impl(impl) != "chunked":
        raise ValueError(f"CoPE paths choose the chunked op's code, not impl {impl!r}")
    return _CoPEContextParallel.apply(q, k, v, pos_emb.to(q.dtype), cp, npos_max,
                                      softmax_scale, impl, paths, Documents.of(starts))
