"""Fused CoPE attention kernels in Triton (GPU; CPU under ``TRITON_INTERPRET=1``).

Forward: one program owns ``BLOCK_M`` query rows of one head and sweeps their key blocks
from the diagonal back to 0, carrying per row the sum of the gates of the keys already
visited, so p_ij = carry + (reverse cumsum within the block); softmax statistics merge
online (FlashAttention's running max and sum). Gates are non-negative, so once every row's
carry exceeds npos_max − 1, every farther key of the block's rows sits at the last
position: its position logit is the row's constant z_i[npos_max − 1], and its gate gets
no gradient. From there on the sweep is plain attention plus that constant (no sigmoid,
cumsum or gather). So each query block has a "near band" of gate work next to the
diagonal, decided at run time (the whole row when gates are sparse and nothing clamps),
and plain key blocks beyond it. The forward saves, per (batch·head, query block), how many
key blocks ran plain, and per row its gate total over the band in fp64 (``Saturation``).

Backward, from that index (no gate sweep to find the band again), in two kernels:
- keys (``_cope_bwd_keys``), FlashAttention-2's shape for the plain tiles: one program owns
  one key block of one key head, keeps its dK and dV in registers, loops over the query
  heads sharing that key head (GQA/MQA) and over the query blocks for which the key block
  is plain, and stores dK, dV once: no atomics, and a fixed summation order.
- rows (``_cope_bwd_rows``), query-major: a program owns ``BLOCK_M`` rows. It takes dq of
  the plain tiles (and their Σ dlogits for dz at the last position), recomputing their
  logits and dO·Vᵀ: 7 matrix products per plain tile against 5 with atomic dK, dV, the
  trade FlashAttention-2's Triton backward makes (``bench/cope_triton_ops.py`` counts
  them in the interpreter). Then the near band, from its far end towards the diagonal:
  a forward cumsum of dp (the adjoint of the positions' reverse cumsum) with the reverse
  carries as total − prefix in fp64 (no fp32 cancellation). The band's dK, dV add
  atomically across query blocks (a key-major band pass would need each row's gate and
  dp prefixes per key block, O(s²/BLOCK_N) memory with sparse gates), onto what the keys
  kernel stored, or under GQA into a copy per query head summed after, so that no
  atomic crosses heads. Its dz, dzd add atomically too, as keys of one tile share
  positions; the rows are the program's own, so programs never contend there.

The pieces the kernels share (tile loads, logits and gates, the position gather) are
``ops.cope.triton_tiles``. z = q·E (and zd, its differences along positions) are computed
outside the kernels, and gathered per element from global memory; so are dq's z part and
dE.

``chunk_forward``/``chunk_backward`` run one (query chunk, key chunk) pair of a sequence
split across context-parallel ranks: the kernels start from a carried gate total per row
(the keys after the chunk), the forward appends its ``Saturation`` to ``bands`` (as the
chunked op records its widths there) and the backward also returns each row's Σ dp.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cope_megatron.ops.cope.blocks import differences, undo_differences
from cope_megatron.ops.cope.chunked import table_backward
from cope_megatron.ops.cope.triton_tiles import (
    add_block,
    block_logits,
    load_block,
    online_softmax,
    position_logits,
    program,
    saturated,
    store_block,
)

BLOCK_M = 128
BLOCK_N = 64
NUM_WARPS = 8
PLAIN_STAGES = 1
"""Software-pipelining depth of the plain-attention loops; the gate loops always run
unpipelined, since Triton 3.6's pipeliner aborts on them ("doesn't know how to predicate
this op"). On an H100 (bf16, 8k tokens) depth 2 or 3 gained under 2% (17.6 and 17.5 ms
against 17.8 ms), and the one GPU failure seen (docs/GPU.md) was with depth 2."""


class Saturation(NamedTuple):
    """What a forward found, for its backward: ``plain`` [b·h, query blocks] (int32), how
    many key blocks (from key 0 on) ran as plain attention; ``total`` [b, h, s] (fp64),
    each row's carry plus its band's gates; ``blocks``, the (BLOCK_M, BLOCK_N) they hold
    for."""

    plain: torch.Tensor
    total: torch.Tensor
    blocks: tuple[int, int]


@triton.jit
def _cope_fwd(Q, K, V, Z, ZD, Carry, Out, Lse, Plain, Total, seq, head_dim, npos, rep, scale,
              npos_max_m1, last_pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              PLAIN_STAGES: tl.constexpr):
    bh, offs_m, offs_d, q_ptr, k_ptr, v_ptr, z_ptr, zd_ptr, n_blocks = program(
        Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    q = load_block(q_ptr, offs_m, offs_d, seq, head_dim, head_dim)
    row_ok = offs_m < seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Σ gates of keys visited so far (all later), from the keys after this chunk on; fp64,
    # so that the backward derives the same carries from the total (see _cope_bwd_rows).
    carry = tl.load(Carry + bh * seq + offs_m, mask=row_ok, other=0.0).to(tl.float64)
    t = 0
    gate_work = (t < n_blocks) & (not saturated(carry, row_ok, npos_max_m1))
    while gate_work:
        offs_n = (n_blocks - 1 - t) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                      scale, CAUSAL, PRECISION)
        p_raw = carry.to(tl.float32)[:, None] + tl.cumsum(g, axis=1, reverse=True)
        carry += tl.sum(g, axis=1).to(tl.float64)
        _, _, _, bias = position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos,
                                        npos_max_m1)
        logits = tl.where(valid, a + bias, float("-inf"))
        v = load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        m_i, l_i, acc = online_softmax(m_i, l_i, acc, logits, v, PRECISION)
        t += 1
        gate_work = (t < n_blocks) & (not saturated(carry, row_ok, npos_max_m1))
    # Every farther key sits at the last position: plain attention plus one logit per row.
    z_last = tl.load(z_ptr + offs_m * npos + last_pos, mask=row_ok, other=0.0)
    for u in tl.range(t, n_blocks, num_stages=PLAIN_STAGES):
        offs_n = (n_blocks - 1 - u) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                      scale, CAUSAL, PRECISION)
        logits = tl.where(valid, a + z_last[:, None], float("-inf"))
        v = load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        m_i, l_i, acc = online_softmax(m_i, l_i, acc, logits, v, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_block(Out + bh * seq * head_dim, offs_m, offs_d, seq, head_dim, head_dim,
                (acc / l_safe[:, None]).to(Out.dtype.element_ty))
    tl.store(Lse + bh * seq + offs_m, m_i + tl.log(l_safe), mask=row_ok)
    tl.store(Total + bh * seq + offs_m, carry, mask=row_ok)
    tl.store(Plain + bh * tl.num_programs(0) + tl.program_id(0), n_blocks - t)


@triton.jit
def _cope_bwd_keys(Q, K, V, Z, DO, Lse, Delta, Plain, DK, DV, seq, head_dim, npos, rep,
                   n_row_blocks, scale, last_pos, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr):
    """dK, dV of one key block from the tiles where it is plain (every one of the query
    block's rows has clamped there): P = exp(a + z_last − lse), dV = Pᵀ·dO,
    dK = scale·(P ⊙ (dO·Vᵀ − Δ))ᵀ·Q, summed over query heads and blocks in registers."""
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_block(K + bg * seq * head_dim, offs_n, offs_d, seq, head_dim, head_dim)
    v = load_block(V + bg * seq * head_dim, offs_n, offs_d, seq, head_dim, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = 0
    if CAUSAL:  # query blocks ending before this key block do not see it
        first = (pid_n * BLOCK_N) // BLOCK_M
    for r in range(0, rep):
        bh = bg * rep + r  # the key head's query heads: b·H + g·rep + r
        for m in range(first, n_row_blocks):
            if tl.load(Plain + bh * n_row_blocks + m) > pid_n:
                offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = offs_m < seq
                q = load_block(Q + bh * seq * head_dim, offs_m, offs_d, seq, head_dim,
                               head_dim)
                do = load_block(DO + bh * seq * head_dim, offs_m, offs_d, seq, head_dim,
                                head_dim)
                # Per row: lse less the far keys' shared position logit.
                shift = tl.load(Lse + bh * seq + offs_m, mask=row_ok, other=0.0) - tl.load(
                    Z + bh * seq * npos + offs_m * npos + last_pos, mask=row_ok, other=0.0)
                delta = tl.load(Delta + bh * seq + offs_m, mask=row_ok, other=0.0)
                # Transposed tiles [keys, rows], so dK and dV take them without transposes.
                valid_t = (offs_n[:, None] < seq) & (offs_m[None, :] < seq)
                if CAUSAL:
                    valid_t = valid_t & (offs_n[:, None] <= offs_m[None, :])
                a_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale
                probs_t = tl.where(valid_t, tl.exp(a_t - shift[None, :]), 0.0)
                dv += tl.dot(probs_t.to(do.dtype), do, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                da_t = probs_t * (dp_t - delta[None, :]) * scale
                dk += tl.dot(da_t.to(q.dtype), q, input_precision=PRECISION)
    store_block(DK + bg * seq * head_dim, offs_n, offs_d, seq, head_dim, head_dim, dk)
    store_block(DV + bg * seq * head_dim, offs_n, offs_d, seq, head_dim, head_dim, dv)


@triton.jit
def _cope_bwd_rows(Q, K, V, Z, ZD, Total, Plain, DO, Lse, Delta, DQ, DK, DV, DZ, DZD, DpSum,
                   seq, head_dim, npos, rep, scale, npos_max_m1, last_pos,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   PLAIN_STAGES: tl.constexpr):
    """dq of all of the rows' tiles, and everything of their near band."""
    bh, offs_m, offs_d, q_ptr, k_ptr, v_ptr, z_ptr, zd_ptr, n_blocks = program(
        Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    dk_ptr, dv_ptr = DK + bh * seq * head_dim, DV + bh * seq * head_dim  # per query head
    q = load_block(q_ptr, offs_m, offs_d, seq, head_dim, head_dim)
    do = load_block(DO + bh * seq * head_dim, offs_m, offs_d, seq, head_dim, head_dim)
    row_ok = offs_m < seq
    lse = tl.load(Lse + bh * seq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * seq + offs_m, mask=row_ok, other=0.0)
    n_plain = tl.load(Plain + bh * tl.num_programs(0) + tl.program_id(0))

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Far keys all clamp to the last position (frac 0): their dz is one sum per row, and
    # their gates get no gradient (positions beyond the clamp do not move). Their dK, dV
    # are the keys kernel's.
    far = tl.zeros([BLOCK_M], tl.float32)
    z_last = tl.load(z_ptr + offs_m * npos + last_pos, mask=row_ok, other=0.0)
    for t in tl.range(0, n_plain, num_stages=PLAIN_STAGES):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, _ = block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                      scale, CAUSAL, PRECISION)
        probs = tl.where(valid, tl.exp(a + z_last[:, None] - lse[:, None]), 0.0)
        v = load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        dlogits = probs * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        far += tl.sum(dlogits, axis=1)
        dq += tl.dot((dlogits * scale).to(k.dtype), k, input_precision=PRECISION)

    # The near band, from its far end towards the diagonal: a forward cumsum of dp (the
    # adjoint of the positions' reverse cumsum), with the reverse carries as total − prefix
    # in fp64 (no fp32 cancellation).
    total = tl.load(Total + bh * seq + offs_m, mask=row_ok, other=0.0)
    prefix = tl.zeros([BLOCK_M], tl.float64)
    dp_carry = tl.zeros([BLOCK_M], tl.float32)  # Σ dp of earlier key blocks
    for t in range(n_plain, n_blocks):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                      scale, CAUSAL, PRECISION)
        block_sum = tl.sum(g, axis=1).to(tl.float64)
        after = (total - prefix - block_sum).to(tl.float32)
        prefix += block_sum
        p_raw = after[:, None] + tl.cumsum(g, axis=1, reverse=True)
        idx, frac, zd_lo, bias = position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos,
                                                 npos_max_m1)
        probs = tl.where(valid, tl.exp(a + bias - lse[:, None]), 0.0)
        v = load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        dlogits = probs * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        add_block(dv_ptr, offs_n, offs_d, seq, head_dim, head_dim,
                  tl.dot(tl.trans(probs.to(do.dtype)), do, input_precision=PRECISION))
        near = valid & (p_raw < npos_max_m1)
        tl.atomic_add(DZ + bh * seq * npos + idx, dlogits, mask=near)
        tl.atomic_add(DZD + bh * seq * npos + idx, dlogits * frac, mask=near)
        far += tl.sum(tl.where(valid & (p_raw >= npos_max_m1), dlogits, 0.0), axis=1)
        dp = tl.where(p_raw <= npos_max_m1, dlogits * zd_lo, 0.0)
        dg = dp_carry[:, None] + tl.cumsum(dp, axis=1)
        dp_carry += tl.sum(dp, axis=1)
        da = tl.where(valid, dlogits + dg * g * (1.0 - g), 0.0) * scale
        dq += tl.dot(da.to(k.dtype), k, input_precision=PRECISION)
        add_block(dk_ptr, offs_n, offs_d, seq, head_dim, head_dim,
                  tl.dot(tl.trans(da.to(q.dtype)), q, input_precision=PRECISION))
    # The band's dz adds stay below the last position (p < npos_max − 1 there), and the
    # rows are this program's: a plain store.
    tl.store(DZ + bh * seq * npos + offs_m * npos + last_pos, far, mask=row_ok)
    store_block(DQ + bh * seq * head_dim, offs_m, offs_d, seq, head_dim, head_dim, dq)
    tl.store(DpSum + bh * seq + offs_m, dp_carry, mask=row_ok)


def _launch_config(q: torch.Tensor, blocks: tuple[int, int]) -> dict:
    d = q.shape[-1]
    return {
        "BLOCK_M": blocks[0],
        "BLOCK_N": blocks[1],
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "num_warps": NUM_WARPS,
        "num_stages": 1,
        # fp32 inputs: exact fp32 products, not TF32, to match the reference.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def forward_blocks(q, k, v, z, carry, *, scale: float, npos_max: int, causal: bool):
    """``chunk_forward``, and what its backward needs to know: (out, lse, ``Saturation``)."""
    b, h, s, d = q.shape
    blocks = (BLOCK_M, BLOCK_N)
    zd = differences(z)
    q, k, v, z, zd, carry = (t.contiguous() for t in (q, k, v, z, zd, carry))
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    total = torch.empty(b, h, s, dtype=torch.float64, device=q.device)
    grid = (triton.cdiv(s, blocks[0]), b * h)
    plain = torch.empty(b * h, grid[0], dtype=torch.int32, device=q.device)
    _cope_fwd[grid](q, k, v, z, zd, carry, out, lse, plain, total, s, d, z.shape[-1],
                    h // k.shape[1], scale, float(npos_max - 1), npos_max - 1, CAUSAL=causal,
                    PLAIN_STAGES=PLAIN_STAGES, **_launch_config(q, blocks))
    return out, lse, Saturation(plain, total, blocks)


def chunk_forward(q, k, v, z, carry, *, scale: float, npos_max: int, causal: bool,
                  bands: list[Saturation] | None = None):
    """``ops.cope.chunked.chunk_forward`` in one kernel launch (q, k, v of one dtype, sq = sk;
    z, carry fp32). Returns (out, lse fp32); appends to ``bands`` what ``chunk_backward``
    needs."""
    out, lse, saturation = forward_blocks(q, k, v, z, carry, scale=scale, npos_max=npos_max,
                                          causal=causal)
    if bands is not None:
        bands.append(saturation)
    return out, lse


def chunk_backward(q, k, v, z, carry, d_out, out, lse, grads, *, scale: float,
                   npos_max: int, causal: bool, bands: list[Saturation]) -> torch.Tensor:
    """``ops.cope.chunked.chunk_backward`` in two kernel launches: gradients (fp32) added
    into ``grads`` = (dq, dk, dv, dz), dk and dv over k's heads; returns each row's Σ dp.
    ``bands``: what ``chunk_forward`` recorded; ``carry`` is unused, being in its totals."""
    (saturation,) = bands
    b, h, s, d = q.shape
    g = k.shape[1]
    zd = differences(z)
    delta = (d_out.float() * out.float()).sum(-1)
    q, k, v, z, zd, d_out, lse, delta = (
        t.contiguous() for t in (q, k, v, z, zd, d_out, lse, delta))
    dq = torch.empty(b, h, s, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)  # every row stored
    dv = torch.empty_like(dk)
    # The bands' dK, dV add atomically across query blocks, into a copy per query head
    # under GQA (summed in order below): no atomic add crosses heads.
    dk_band, dv_band = (dk, dv) if h == g else (torch.zeros_like(dq) for _ in range(2))
    dz, dzd = torch.zeros_like(z), torch.zeros_like(z)
    dp_sum = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    config = _launch_config(q, saturation.blocks)
    rows = saturation.plain.shape[1]
    # Keys first: they store dK, dV whole; without GQA the rows' bands then add onto them.
    _cope_bwd_keys[(triton.cdiv(s, config["BLOCK_N"]), b * g)](
        q, k, v, z, d_out, lse, delta, saturation.plain, dk, dv, s, d, z.shape[-1], h // g,
        rows, scale, npos_max - 1, CAUSAL=causal, **config)
    _cope_bwd_rows[(rows, b * h)](
        q, k, v, z, zd, saturation.total, saturation.plain, d_out, lse, delta, dq, dk_band,
        dv_band, dz, dzd, dp_sum, s, d, z.shape[-1], h // g, scale, float(npos_max - 1),
        npos_max - 1, CAUSAL=causal, PLAIN_STAGES=PLAIN_STAGES, **config)
    if h != g:
        dk += dk_band.unflatten(1, (g, h // g)).sum(2)
        dv += dv_band.unflatten(1, (g, h // g)).sum(2)
    for acc, grad in zip(grads, (dq, dk, dv, undo_differences(dz, dzd))):
        acc += grad
    return dp_sum


class _CoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal):
        z = q.float() @ pos_emb.float()  # [b, h, s, npos]
        carry = torch.zeros(z.shape[:3], dtype=torch.float32, device=q.device)
        out, lse, saturation = forward_blocks(q, k, v, z, carry, scale=scale,
                                              npos_max=npos_max, causal=causal)
        ctx.save_for_backward(q, k, v, pos_emb, out, lse, saturation.plain, saturation.total)
        ctx.cfg = (npos_max, scale, causal, saturation.blocks)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse, plain, total = ctx.saved_tensors
        npos_max, scale, causal, blocks = ctx.cfg
        z = q.float() @ pos_emb.float()
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                      for t in (q, k, v))
        dz = torch.zeros_like(z)
        chunk_backward(q, k, v, z, None, d_out, out, lse, (dq, dk, dv, dz),
                       scale=scale, npos_max=npos_max, causal=causal,
                       bands=[Saturation(plain, total, blocks)])
        dq_table, d_emb = table_backward(q.float(), pos_emb.float(), dz)
        dq += dq_table
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_emb.to(pos_emb.dtype),
                None, None, None)


def cope_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_emb: torch.Tensor,
    *,
    npos_max: int,
    softmax_scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d]; pos_emb [h or 1, d, npos] -> [b, h, s, d]."""
    return _CoPETriton.apply(q, k, v, pos_emb, npos_max, softmax_scale, causal)
