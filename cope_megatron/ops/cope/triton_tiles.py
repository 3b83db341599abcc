"""Tile-level pieces of the Triton CoPE kernels (``ops.cope.triton_kernels``), shared by
the forward and both backward kernels: masked block loads and stores, one tile's logits
and gates, its position logits gathered from z, a program's rows and pointers, the
saturation test, and one online-softmax step."""

import triton
import triton.language as tl


@triton.jit
def load_block(ptr, rows, cols, n_rows, n_cols, stride):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_block(ptr, rows, cols, n_rows, n_cols, stride, tile):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], tile, mask=mask)


@triton.jit
def add_block(ptr, rows, cols, n_rows, n_cols, stride, tile):
    """Atomically add ``tile`` into the (rows, cols) block: other query blocks' bands add
    into the same key rows."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.atomic_add(ptr + rows[:, None] * stride + cols[None, :], tile, mask=mask)


@triton.jit
def block_logits(q, k_ptr, offs_m, offs_n, offs_d, seq, head_dim, scale,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Logits a, validity mask, gates g for one (query block, key block) tile."""
    k = load_block(k_ptr, offs_n, offs_d, seq, head_dim, head_dim)
    a = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    valid = (offs_n[None, :] < seq) & (offs_m[:, None] < seq)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    a = tl.where(valid, a, float("-inf"))
    g = tl.where(valid, tl.sigmoid(a), 0.0)
    return k, a, valid, g


@triton.jit
def position_logits(z_ptr, zd_ptr, offs_m, p_raw, valid, npos, npos_max_m1):
    # tl.minimum drops a NaN operand (minnum), so a NaN position (a diverged run) reads the
    # last entry, inside the table; its row is NaN anyway, through the NaN logits or gates
    # that made the position NaN.
    p = tl.minimum(p_raw, npos_max_m1)
    lo = tl.floor(p)
    frac = p - lo
    idx = offs_m[:, None] * npos + lo.to(tl.int32)
    z_lo = tl.load(z_ptr + idx, mask=valid, other=0.0)
    zd_lo = tl.load(zd_ptr + idx, mask=valid, other=0.0)
    return idx, frac, zd_lo, z_lo + frac * zd_lo


@triton.jit
def program(Q, K, V, Z, ZD, seq, head_dim, npos, rep, BLOCK_M: tl.constexpr,
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
def saturated(carry, row_ok, npos_max_m1):
    """Whether every row's gate total over the keys after the current block exceeds the last
    position: then this block and all farther ones clamp to it. Strictly above, so a key on
    the clamp boundary keeps its one-sided derivative through the gate path."""
    return tl.min(tl.where(row_ok, carry, float("inf"))) > npos_max_m1


@triton.jit
def online_softmax(m_i, l_i, acc, logits, v, PRECISION: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    probs = tl.exp(logits - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
