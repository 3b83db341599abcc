"""Fused CoPE attention kernels in Triton (GPU; CPU under ``TRITON_INTERPRET=1``).

One program owns ``BLOCK_M`` query rows of one head and sweeps their key blocks:

- forward visits key blocks from the diagonal back to 0, carrying per row the sum of the
  gates of the keys already visited, so p_ij = carry + (reverse cumsum within the block);
  softmax statistics merge online (FlashAttention's running max and sum).
- backward needs both that reverse sum (for p) and a forward cumsum of dp (the adjoint of
  the reverse cumsum). A first sweep totals each row's gates in fp64; a second sweep goes
  from key block 0 upwards, deriving the reverse carry as total − prefix in fp64 (no fp32
  cancellation) and carrying Σ dp forwards. dK, dV and dz (the position-logit table
  gradient per row) are accumulated with atomic adds.

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

from cope_megatron.ops.cope_chunked import differences, table_backward

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _load_block(ptr, rows, cols, n_rows, n_cols, stride):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


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
def _cope_fwd(Q, K, V, Z, ZD, Carry, Out, Lse, seq, head_dim, npos, rep, scale, npos_max_m1,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    bh, offs_m, offs_d, q_ptr, k_ptr, v_ptr, z_ptr, zd_ptr, n_blocks = _program(
        Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    q = _load_block(q_ptr, offs_m, offs_d, seq, head_dim, head_dim)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Σ gates of keys visited so far (all later), starting from the keys after this chunk
    carry = tl.load(Carry + bh * seq + offs_m, mask=offs_m < seq, other=0.0)
    for t in range(0, n_blocks):
        offs_n = (n_blocks - 1 - t) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                       scale, CAUSAL, PRECISION)
        p_raw = carry[:, None] + tl.cumsum(g, axis=1, reverse=True)
        carry += tl.sum(g, axis=1)
        _, _, _, bias = _position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos,
                                         npos_max_m1)
        logits = tl.where(valid, a + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        probs = tl.exp(logits - m_safe[:, None])
        v = _load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    row_ok = offs_m < seq
    o_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    tl.store(Out + bh * seq * head_dim + offs_m[:, None] * head_dim + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(Lse + bh * seq + offs_m, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _cope_bwd(Q, K, V, Z, ZD, Carry, DO, Lse, Delta, DQ, DK, DV, DZ, DZD, DpSum, seq, head_dim,
              npos, rep, scale, npos_max_m1, last_pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    bh, offs_m, offs_d, q_ptr, k_ptr, v_ptr, z_ptr, zd_ptr, n_blocks = _program(
        Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    bg = bh // rep
    q = _load_block(q_ptr, offs_m, offs_d, seq, head_dim, head_dim)
    do = _load_block(DO + bh * seq * head_dim, offs_m, offs_d, seq, head_dim, head_dim)
    row_ok = offs_m < seq
    lse = tl.load(Lse + bh * seq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * seq + offs_m, mask=row_ok, other=0.0)

    # The keys after this chunk plus Σ_j g_ij, in fp64: reverse carries below
    total = tl.load(Carry + bh * seq + offs_m, mask=row_ok, other=0.0).to(tl.float64)
    for t in range(0, n_blocks):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        _, _, _, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim, scale,
                                   CAUSAL, PRECISION)
        total += tl.sum(g, axis=1).to(tl.float64)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    prefix = tl.zeros([BLOCK_M], tl.float64)  # Σ gates of earlier key blocks
    dp_carry = tl.zeros([BLOCK_M], tl.float32)  # Σ dp of earlier key blocks
    kv_mask_d = offs_d[None, :] < head_dim
    for t in range(0, n_blocks):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k, a, valid, g = _block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim,
                                       scale, CAUSAL, PRECISION)
        block_sum = tl.sum(g, axis=1)
        after = (total - prefix - block_sum.to(tl.float64)).to(tl.float32)
        prefix += block_sum.to(tl.float64)
        p_raw = after[:, None] + tl.cumsum(g, axis=1, reverse=True)
        idx, frac, zd_lo, bias = _position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos,
                                                  npos_max_m1)
        probs = tl.where(valid, tl.exp(a + bias - lse[:, None]), 0.0)
        v = _load_block(v_ptr, offs_n, offs_d, seq, head_dim, head_dim)
        dlogits = probs * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        kv_rows = offs_n[:, None] < seq
        kv_off = bg * seq * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
        tl.atomic_add(DV + kv_off, tl.dot(tl.trans(probs.to(do.dtype)), do,
                                          input_precision=PRECISION), mask=kv_rows & kv_mask_d)
        # Far keys all clamp to the last position (frac 0): one atomic per row for them
        # instead of one per key, which would all hit the same address.
        clamped = p_raw >= npos_max_m1
        near = valid & (p_raw < npos_max_m1)
        tl.atomic_add(DZ + bh * seq * npos + idx, dlogits, mask=near)
        tl.atomic_add(DZD + bh * seq * npos + idx, dlogits * frac, mask=near)
        far = tl.sum(tl.where(valid & clamped, dlogits, 0.0), axis=1)
        tl.atomic_add(DZ + bh * seq * npos + offs_m * npos + last_pos, far, mask=row_ok)
        dp = tl.where(p_raw <= npos_max_m1, dlogits * zd_lo, 0.0)
        dg = dp_carry[:, None] + tl.cumsum(dp, axis=1)
        dp_carry += tl.sum(dp, axis=1)
        da = tl.where(valid, dlogits + dg * g * (1.0 - g), 0.0) * scale
        dq += tl.dot(da.to(k.dtype), k, input_precision=PRECISION)
        tl.atomic_add(DK + kv_off, tl.dot(tl.trans(da.to(q.dtype)), q, input_precision=PRECISION),
                      mask=kv_rows & kv_mask_d)
    tl.store(DQ + bh * seq * head_dim + offs_m[:, None] * head_dim + offs_d[None, :], dq,
             mask=row_ok[:, None] & kv_mask_d)
    tl.store(DpSum + bh * seq + offs_m, dp_carry, mask=row_ok)


def _launch_config(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    return {
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        # fp32 inputs: exact fp32 products, not TF32, to match the reference.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def chunk_forward(q, k, v, z, zd, carry, *, scale: float, npos_max: int, causal: bool):
    """``ops.cope_chunked.chunk_forward`` in one kernel launch (q, k, v of one dtype, sq = sk;
    z, zd, carry fp32). Returns (out, lse fp32)."""
    b, h, s, d = q.shape
    q, k, v, z, zd, carry = (t.contiguous() for t in (q, k, v, z, zd, carry))
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(s, BLOCK_M), b * h)
    _cope_fwd[grid](q, k, v, z, zd, carry, out, lse, s, d, z.shape[-1], h // k.shape[1], scale,
                    float(npos_max - 1), CAUSAL=causal, **_launch_config(q))
    return out, lse


def chunk_backward(q, k, v, z, zd, carry, d_out, lse, delta, grads, *, scale: float,
                   npos_max: int, causal: bool) -> torch.Tensor:
    """``ops.cope_chunked.chunk_backward`` in one kernel launch: gradients (fp32) added into
    ``grads`` = (dq, dk, dv, dz, dzd), dk and dv over k's heads; returns each row's Σ dp."""
    b, h, s, d = q.shape
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
    for acc, grad in zip(grads, (dq, dk, dv, dz, dzd)):
        acc += grad
    return dp_sum


class _CoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal):
        z = q.float() @ pos_emb.float()  # [b, h, s, npos]
        carry = torch.zeros(z.shape[:3], dtype=torch.float32, device=q.device)
        out, lse = chunk_forward(q, k, v, z, differences(z), carry, scale=scale,
                                 npos_max=npos_max, causal=causal)
        ctx.save_for_backward(q, k, v, pos_emb, out, lse)
        ctx.cfg = (npos_max, scale, causal)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse = ctx.saved_tensors
        npos_max, scale, causal = ctx.cfg
        z = q.float() @ pos_emb.float()
        delta = (d_out.float() * out.float()).sum(-1)
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device)
                      for t in (q, k, v))
        dz, dzd = torch.zeros_like(z), torch.zeros_like(z)
        chunk_backward(q, k, v, z, differences(z), torch.zeros_like(lse), d_out, lse, delta,
                       (dq, dk, dv, dz, dzd), scale=scale, npos_max=npos_max, causal=causal)
        dq_table, d_emb = table_backward(q.float(), pos_emb.float(), dz, dzd)
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
