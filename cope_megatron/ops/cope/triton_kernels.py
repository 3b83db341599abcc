"""Fused CoPE attention kernels in Triton (GPU; CPU under ``TRITON_INTERPRET=1``).

One program owns ``BLOCK_M`` query rows of one head and sweeps their key blocks:

- forward visits key blocks from the diagonal back to 0, carrying per row the sum of the
  gates of the keys already visited, so p_ij = carry + (reverse cumsum within the block);
  softmax statistics merge online (FlashAttention's running max and sum).
- Gates are non-negative, so once every row's carry exceeds npos_max − 1, every farther
  key of the block's rows sits at the last position: its position logit is the row's
  constant z_i[npos_max − 1], and its gate gets no gradient. From there on the sweep is
  plain attention plus that constant (no sigmoid, cumsum or gather): the "near band" of
  gate work is decided per query block at run time, and is the whole row when gates are
  sparse and nothing clamps.
- backward needs both that reverse sum (for p) and a forward cumsum of dp (the adjoint of
  the reverse cumsum). It first re-runs the forward's gate sweep (gates only) to find the
  same near band and its gate total in fp64; then it runs the plain key blocks, and the
  band from its far end towards the diagonal, deriving the reverse carry as total − prefix
  in fp64 (no fp32 cancellation) and carrying Σ dp forwards. dK, dV and dz (the
  position-logit table gradient per row) are accumulated with atomic adds.

z = q·E (and zd, its differences along positions) are computed outside the kernels, and
gathered per element from global memory; so are dq's z part and dE.

``chunk_forward``/``chunk_backward`` run one (query chunk, key chunk) pair of a sequence
split across context-parallel ranks: the kernels start from a carried gate total per row
(the keys after the chunk) and the backward also returns each row's Σ dp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cope_megatron.ops.cope.blocks import differences, undo_differences
from cope_megatron.ops.cope.chunked import table_backward

BLOCK_M = 128
BLOCK_N = 64
NUM_WARPS = 8
PLAIN_STAGES = 1
"""Software-pipelining depth of the plain-attention loops; the gate loops always run
unpipelined, since Triton 3.6's pipeliner aborts on them ("doesn't know how to predicate
this op"). On an H100 (bf16, 8k tokens) depth 2 or 3 gained under 2% (17.6 and 17.5 ms
against 17.8 ms), and the one GPU failure seen (docs/GPU.md) was with depth 2."""


@triton.jit
def _load_block(ptr, rows, cols, n_rows, n_cols, stride):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _add_block(ptr, rows, cols, n_rows, n_cols, stride, tile):
    """Atomically add ``tile`` into the (rows, cols) block: other query blocks add into the
    same key rows."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.atomic_add(ptr + rows[:, None] * stride + cols[None, :], tile, mask=mask)


@triton.jit
def _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim, scale,
                  CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Logits a, validity mask, gates g for one (query block, key block) tile."""
    k = _load_block(k_ptr, offs_n, offs_d, seq, head_dim, head_dim)
    a = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    valid = (offs_n[None, :] < seq) & (offs_m[:, None] < seq)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    a = tl.where(valid, a, float("-inf"))
    g = tl.where(valid, tl.sigmoid(a), 0.0)
    return k, a, valid, g


@triton.jit
def _position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos, npos_max_m1):
    p = tl.minimum(p_raw, npos_max_m1)
    lo = tl.floor(p)
    frac = p - lo
    idx = offs_m[:, None] * npos + lo.to(tl.int32)
    z_lo = tl.load(z_ptr + idx, mask=valid, other=0.0)
    zd_lo = tl.load(zd_ptr + idx, mask=valid, other=0.0)
    return idx, frac, zd_lo, z_lo + frac * zd_lo


@triton.jit
def _program(Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's head, rows, per-head pointers, and how many key blocks its rows see."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bg = bh // rep  # (b·H + h) // rep == b·G + h // rep, since H = G·rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_blocks = tl.cdiv(seq, BLOCK_N)
    if CAUSAL:  # keys past the block's last row are masked for all of its rows
        n_blocks = tl.cdiv(tl.minimum((pid_m + 1) * BLOCK_M, seq), BLOCK_N)
    return (bh, offs_m, offs_d, Q + bh * seq * head_dim, K + bg * seq * head_dim,
            V + bg * seq * head_dim, Z + bh * seq * npos, ZD + bh * seq * npos, n_blocks)


@triton.jit
def _saturated(carry, row_ok, npos_max_m1):
    """Whether every row's gate total over the keys after the current block exceeds the last
    position: then this block and all farther ones clamp to it. Strictly above, so a key on
    the clamp boundary keeps its one-sided derivative through the gate path."""
    return tl.min(tl.where(row_ok, carry, float("inf"))) > npos_max_m1


@triton.jit
def _online_softmax(m_i, l_i, acc, logits, v, PRECISION: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    probs = tl.exp(logits - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _cope_fwd(Q, K, V, Z, ZD, Carry, Out, Lse, Counts, seq, head_dim, npos, rep, scale,
              npos_max_m1, last_pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              PLAIN_STAGES: tl.constexpr):
    bh, offs_m, offs_d, q_ptr, k_ptr, v_ptr, z_ptr, zd_ptr, n_blocks = _program(
        Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    q = _load_block(q_ptr, offs_m, offs_d, seq, head_dim, head_dim)
    row_ok = offs_m < seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Σ gates of keys visited so far (all later), from the keys after this chunk on; fp64,
    # so that the backward re-derives the same carries from a total (see _cope_bwd).
    carry = tl.load(Carry + bh * seq + offs_m, mask=row_ok, other=0.0).to(tl.float64)
    t = 0
    gate_work = (t < n_blocks) & (not _saturated(carry, row_ok, npos_max_m1))
    while gate_work:
        offs_n = (n_blocks - 1 - t) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                       scale, CAUSAL, PRECISION)
        p_raw = carry.to(tl.float32)[:, None] + tl.cumsum(g, axis=1, reverse=True)
        carry += tl.sum(g, axis=1).to(tl.float64)
        _, _, _, bias = _position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos,
                                         npos_max_m1)
        logits = tl.where(valid, a + bias, float("-inf"))
        v = _load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        m_i, l_i, acc = _online_softmax(m_i, l_i, acc, logits, v, PRECISION)
        t += 1
        gate_work = (t < n_blocks) & (not _saturated(carry, row_ok, npos_max_m1))
    # Every farther key sits at the last position: plain attention plus one logit per row.
    z_last = tl.load(z_ptr + offs_m * npos + last_pos, mask=row_ok, other=0.0)
    for u in tl.range(t, n_blocks, num_stages=PLAIN_STAGES):
        offs_n = (n_blocks - 1 - u) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                       scale, CAUSAL, PRECISION)
        logits = tl.where(valid, a + z_last[:, None], float("-inf"))
        v = _load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        m_i, l_i, acc = _online_softmax(m_i, l_i, acc, logits, v, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    tl.store(Out + bh * seq * head_dim + offs_m[:, None] * head_dim + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(Lse + bh * seq + offs_m, m_i + tl.log(l_safe), mask=row_ok)
    tl.store(Counts + bh * tl.num_programs(0) + tl.program_id(0), n_blocks - t)


@triton.jit
def _cope_bwd(Q, K, V, Z, ZD, Carry, DO, Lse, Delta, DQ, DK, DV, DZ, DZD, DpSum, seq, head_dim,
              npos, rep, scale, npos_max_m1, last_pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              PLAIN_STAGES: tl.constexpr):
    bh, offs_m, offs_d, q_ptr, k_ptr, v_ptr, z_ptr, zd_ptr, n_blocks = _program(
        Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    bg = bh // rep  # dK, dV are over key heads, like K and V
    dk_ptr, dv_ptr = DK + bg * seq * head_dim, DV + bg * seq * head_dim
    q = _load_block(q_ptr, offs_m, offs_d, seq, head_dim, head_dim)
    do = _load_block(DO + bh * seq * head_dim, offs_m, offs_d, seq, head_dim, head_dim)
    row_ok = offs_m < seq
    lse = tl.load(Lse + bh * seq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * seq + offs_m, mask=row_ok, other=0.0)

    # The forward's gate sweep again, gates only: it finds the same near band (key blocks
    # with unclamped positions) and totals its gates in fp64 as the forward carried them.
    total = tl.load(Carry + bh * seq + offs_m, mask=row_ok, other=0.0).to(tl.float64)
    n_gate = 0
    gate_work = (n_gate < n_blocks) & (not _saturated(total, row_ok, npos_max_m1))
    while gate_work:
        offs_n = (n_blocks - 1 - n_gate) * BLOCK_N + tl.arange(0, BLOCK_N)
        _, _, _, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim, scale,
                                   CAUSAL, PRECISION)
        total += tl.sum(g, axis=1).to(tl.float64)
        n_gate += 1
        gate_work = (n_gate < n_blocks) & (not _saturated(total, row_ok, npos_max_m1))
    n_plain = n_blocks - n_gate

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Far keys all clamp to the last position (frac 0): their dz is one sum per row, and
    # their gates get no gradient (positions beyond the clamp do not move).
    far = tl.zeros([BLOCK_M], tl.float32)
    z_last = tl.load(z_ptr + offs_m * npos + last_pos, mask=row_ok, other=0.0)
    for t in tl.range(0, n_plain, num_stages=PLAIN_STAGES):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, _ = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                       scale, CAUSAL, PRECISION)
        probs = tl.where(valid, tl.exp(a + z_last[:, None] - lse[:, None]), 0.0)
        v = _load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        dlogits = probs * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        far += tl.sum(dlogits, axis=1)
        _add_block(dv_ptr, offs_n, offs_d, seq, head_dim, head_dim,
                   tl.dot(tl.trans(probs.to(do.dtype)), do, input_precision=PRECISION))
        da = dlogits * scale
        dq += tl.dot(da.to(k.dtype), k, input_precision=PRECISION)
        _add_block(dk_ptr, offs_n, offs_d, seq, head_dim, head_dim,
                   tl.dot(tl.trans(da.to(q.dtype)), q, input_precision=PRECISION))

    # The near band, from its far end towards the diagonal: a forward cumsum of dp (the
    # adjoint of the positions' reverse cumsum), with the reverse carries as total − prefix
    # in fp64 (no fp32 cancellation).
    prefix = tl.zeros([BLOCK_M], tl.float64)
    dp_carry = tl.zeros([BLOCK_M], tl.float32)  # Σ dp of earlier key blocks
    for t in range(n_plain, n_blocks):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                       scale, CAUSAL, PRECISION)
        block_sum = tl.sum(g, axis=1).to(tl.float64)
        after = (total - prefix - block_sum).to(tl.float32)
        prefix += block_sum
        p_raw = after[:, None] + tl.cumsum(g, axis=1, reverse=True)
        idx, frac, zd_lo, bias = _position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos,
                                                  npos_max_m1)
        probs = tl.where(valid, tl.exp(a + bias - lse[:, None]), 0.0)
        v = _load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        dlogits = probs * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        _add_block(dv_ptr, offs_n, offs_d, seq, head_dim, head_dim,
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
        _add_block(dk_ptr, offs_n, offs_d, seq, head_dim, head_dim,
                   tl.dot(tl.trans(da.to(q.dtype)), q, input_precision=PRECISION))
    tl.atomic_add(DZ + bh * seq * npos + offs_m * npos + last_pos, far, mask=row_ok)
    tl.store(DQ + bh * seq * head_dim + offs_m[:, None] * head_dim + offs_d[None, :], dq,
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(DpSum + bh * seq + offs_m, dp_carry, mask=row_ok)


def _launch_config(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    return {
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "num_warps": NUM_WARPS,
        "num_stages": 1,
        "PLAIN_STAGES": PLAIN_STAGES,
        # fp32 inputs: exact fp32 products, not TF32, to match the reference.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def forward_blocks(q, k, v, z, carry, *, scale: float, npos_max: int, causal: bool):
    """``chunk_forward``, and for each (batch·head, query block) how many of its key blocks
    ran as plain attention because every row had clamped: (out, lse, plain [b·h, blocks])."""
    b, h, s, d = q.shape
    zd = differences(z)
    q, k, v, z, zd, carry = (t.contiguous() for t in (q, k, v, z, zd, carry))
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s, BLOCK_M), b * h)
    plain = torch.empty(b * h, grid[0], dtype=torch.int32, device=q.device)
    _cope_fwd[grid](q, k, v, z, zd, carry, out, lse, plain, s, d, z.shape[-1], h // k.shape[1],
                    scale, float(npos_max - 1), npos_max - 1, CAUSAL=causal,
                    **_launch_config(q))
    return out, lse, plain


def chunk_forward(q, k, v, z, carry, *, scale: float, npos_max: int, causal: bool):
    """``ops.cope.chunked.chunk_forward`` in one kernel launch (q, k, v of one dtype, sq = sk;
    z, carry fp32). Returns (out, lse fp32)."""
    return forward_blocks(q, k, v, z, carry, scale=scale, npos_max=npos_max, causal=causal)[:2]


def chunk_backward(q, k, v, z, carry, d_out, out, lse, grads, *, scale: float,
                   npos_max: int, causal: bool) -> torch.Tensor:
    """``ops.cope.chunked.chunk_backward`` in one kernel launch: gradients (fp32) added into
    ``grads`` = (dq, dk, dv, dz), dk and dv over k's heads; returns each row's Σ dp."""
    b, h, s, d = q.shape
    zd = differences(z)
    delta = (d_out.float() * out.float()).sum(-1)
    q, k, v, z, zd, carry, d_out, lse, delta = (
        t.contiguous() for t in (q, k, v, z, zd, carry, d_out, lse, delta))
    dq = torch.empty(b, h, s, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    dz, dzd = torch.zeros_like(z), torch.zeros_like(z)
    dp_sum = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s, BLOCK_M), b * h)
    _cope_bwd[grid](q, k, v, z, zd, carry, d_out, lse, delta, dq, dk, dv, dz, dzd, dp_sum, s, d,
                    z.shape[-1], h // k.shape[1], scale, float(npos_max - 1), npos_max - 1,
                    CAUSAL=causal, **_launch_config(q))
    for acc, grad in zip(grads, (dq, dk, dv, undo_differences(dz, dzd))):
        acc += grad
    return dp_sum


class _CoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal):
        z = q.float() @ pos_emb.float()  # [b, h, s, npos]
        carry = torch.zeros(z.shape[:3], dtype=torch.float32, device=q.device)
        out, lse = chunk_forward(q, k, v, z, carry, scale=scale, npos_max=npos_max,
                                 causal=causal)
        ctx.save_for_backward(q, k, v, pos_emb, out, lse)
        ctx.cfg = (npos_max, scale, causal)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse = ctx.saved_tensors
        npos_max, scale, causal = ctx.cfg
        z = q.float() @ pos_emb.float()
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                      for t in (q, k, v))
        dz = torch.zeros_like(z)
        chunk_backward(q, k, v, z, torch.zeros_like(lse), d_out, out, lse, (dq, dk, dv, dz),
                       scale=scale, npos_max=npos_max, causal=causal)
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
