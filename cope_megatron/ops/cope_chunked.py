"""Memory-efficient exact CoPE on any device: query blocks, recomputed in backward.

CoPE's position of key j for query i, p_ij = Σ_{t=j..i} σ(a_it), is a reverse cumulative
sum along the key axis, so a query row needs all of its keys at once: FlashAttention's
key tiling does not apply directly. A block of ``block`` query rows is processed against
the keys up to its last row (later keys are masked for every row in it), which bounds the
live working set at O(block · s) per head. Only q, k, v, the table, the output and one
log-sum-exp per row are saved; backward recomputes each block.

Backward, per block (a: logits, g = σ(a), p = revcumsum(g), b: position logits,
P = softmax(a + b)):
    dL/d(a+b) = P ⊙ (dP − rowsum(dO ⊙ O))             (softmax)
    db  → dz at ⌊p⌋, ⌈p⌉ with weights 1−frac, frac;  dfrac = db ⊙ (z⌈p⌉ − z⌊p⌋)
          (computed as b = z[⌊p⌋] + frac·zd[⌊p⌋] with zd the differences of z)
    dp  = dfrac where p ≤ npos_max − 1 (clamp);      dg = cumsum(dp)  (revcumsum's adjoint)
    da  = dL/d(a+b) + dg ⊙ g ⊙ (1 − g)
z = q·E and its gradients (dq += dz·Eᵀ, dE = qᵀ·dz) are done once for the whole sequence.

The same block math serves one (query chunk, key chunk) pair of a sequence split across
ranks (``chunk_forward``/``chunk_backward``, used by ``distributed.cp_cope``): ``carry``
adds to every row's positions the gate total of the keys that lie after the chunk, the
forward returns the log-sum-exp for merging partial softmaxes, and the backward returns
each row's Σ dp, the carry the adjoint needs into later chunks.

The per-block math is mostly elementwise passes; ``torch.compile`` fuses them (about 3×
faster on CPU, see bench/cope_op.py). Compilation costs seconds once per process, so it is
used from ``COMPILE_MIN_SEQ`` keys on, where it pays for itself.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch

from cope_megatron.ops.cope_reference import expand_kv, reverse_cumsum
from cope_megatron.ops.plain_attention import (
    attention_backward,
    attention_with_lse,
    merge_softmax,
)

DEFAULT_BLOCK = 128
COMPILE_MIN_SEQ = 1024


def _recompute(a, z_blk, zd_blk, carry_blk, npos_max: int):
    """From the band's logits a [b, h, B, L] (masked keys −∞): gates, raw positions,
    interpolation terms and the full logits."""
    g = torch.sigmoid(a)  # masked keys: σ(−∞) = 0
    p_raw = reverse_cumsum(g) + carry_blk[..., None]
    p = p_raw.clamp(max=npos_max - 1)
    lo_f = p.floor()
    frac = p - lo_f
    lo = lo_f.long()
    # z⌊p⌋ + frac·(z⌈p⌉ − z⌊p⌋), with zd[n] = z[n+1] − z[n]: one index instead of two (at
    # integer p, frac = 0 and the difference term vanishes).
    zd_lo = zd_blk.gather(-1, lo)
    logits = a + z_blk.gather(-1, lo) + frac * zd_lo
    return g, p_raw, lo, frac, zd_lo, logits


def _forward_block(a, v_blk, z_blk, zd_blk, carry_blk, npos_max: int):
    *_, logits = _recompute(a, z_blk, zd_blk, carry_blk, npos_max)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]) @ v_blk, lse


def _backward_block(a, q_blk, k_blk, v_blk, z_blk, zd_blk, carry_blk, do_blk, lse_blk, delta_blk,
                    scale: float, npos_max: int):
    g, p_raw, lo, frac, zd_lo, logits = _recompute(a, z_blk, zd_blk, carry_blk, npos_max)
    probs = torch.exp(logits - lse_blk[..., None])
    dv = probs.transpose(-1, -2) @ do_blk
    dlogits = probs * (do_blk @ v_blk.transpose(-1, -2) - delta_blk[..., None])
    dz = torch.zeros_like(z_blk).scatter_add_(-1, lo, dlogits)
    dzd = torch.zeros_like(z_blk).scatter_add_(-1, lo, dlogits * frac)
    dp = torch.where(p_raw <= npos_max - 1, dlogits * zd_lo, 0.0)
    dp_cum = dp.cumsum(-1)
    # Masked keys have P = 0 and g = 0, so their da is exactly 0.
    da = dlogits + dp_cum * g * (1 - g)
    # A row's logit gradients sum to zero over all its keys (softmax), so the keys beyond
    # the band, all at the last position, add −Σ_band to dz there (see chunk_backward).
    dz[..., npos_max - 1] -= dlogits.sum(-1)
    return (scale * (da @ k_blk), scale * (da.transpose(-1, -2) @ q_blk), dv, dz, dzd,
            dp_cum[..., -1])


def differences(z: torch.Tensor) -> torch.Tensor:
    """zd[n] = z[n+1] − z[n], zero at the last entry."""
    return torch.nn.functional.pad(z[..., 1:] - z[..., :-1], (0, 1))


def undo_differences(dz: torch.Tensor, dzd: torch.Tensor) -> torch.Tensor:
    """Adjoint of z ↦ (z, zd): dz[n] += dzd[n−1] − dzd[n] (the padded last zd has none)."""
    dzd = dzd[..., :-1]
    return dz + torch.nn.functional.pad(dzd, (1, 0)) - torch.nn.functional.pad(dzd, (0, 1))


def table_backward(q: torch.Tensor, pos_emb: torch.Tensor, dz: torch.Tensor,
                   dzd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through z = q·E: (the dq term, dE), from the accumulated dz and dzd."""
    dz = undo_differences(dz, dzd)
    d_emb = q.transpose(-1, -2) @ dz  # [b, h, d, npos]
    d_emb = d_emb.sum(0) if pos_emb.shape[0] == q.shape[1] else d_emb.sum((0, 1))[None]
    return dz @ pos_emb.transpose(-1, -2), d_emb


@functools.cache
def _compiled(fn):
    compiled = torch.compile(fn, dynamic=True)

    @functools.wraps(fn)
    def call(*args):
        # Without this, dynamo equates sizes that merely coincide in the first call
        # (block rows = keys of the first block, offsets = sizes) and recompiles for
        # every later block until it gives up and runs eagerly.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*args)

    return call


@functools.cache
def _can_compile(device: torch.device) -> bool:
    """Inductor emits C++ on CPU and Triton on GPU; without the toolchain, stay eager."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


def _kernel(fn, compile: bool | None, keys: int, device: torch.device):
    if compile is None:
        compile = keys >= COMPILE_MIN_SEQ and _can_compile(device)
    return _compiled(fn) if compile else fn


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32: the gate sums and softmax need it."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _blocks(sq: int, sk: int, block: int, causal: bool):
    """(first row, last row + 1, keys visible to the block) for each query block."""
    for i0 in range(0, sq, block):
        i1 = min(sq, i0 + block)
        yield i0, i1, (i1 if causal else sk)


def row_gates(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float,
              causal: bool, key_start: int = 0) -> torch.Tensor:
    """Gates σ(a_ij) of the query rows ``rows`` (indices into q's rows) for keys k, the
    keys from ``key_start`` on; zero for keys after the row when ``causal``:
    q [b, h, sq, d], k [b, h, sk, d] -> [b, h, len(rows), sk]."""
    g = torch.sigmoid(scale * (q[:, :, rows] @ k.transpose(-1, -2)))
    if causal:
        cols = torch.arange(key_start, key_start + k.shape[2], device=k.device)
        g = g.masked_fill(cols > rows[:, None], 0.0)
    return g


def gate_sums(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, *, scale: float,
              causal: bool, limit: float, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Σ_j σ(a_ij) over each selected row's visible keys -> [b, h, len(rows)], exact below
    ``limit`` and at least ``limit`` otherwise. Key blocks are summed from the last one back
    and a row block stops once all its rows reach ``limit``: beyond the clamp a position's
    exact value does not matter, and gates of near keys usually get there quickly."""
    sums = []
    for i in range(0, rows.numel(), block):
        idx = rows[i:i + block]
        keys = int(idx.max()) + 1 if causal else k.shape[2]
        acc = q.new_zeros(*q.shape[:2], idx.numel())
        for j1 in range(keys, 0, -block):
            j0 = max(0, j1 - block)
            acc += row_gates(q, k[:, :, j0:j1], idx, scale=scale, causal=causal,
                             key_start=j0).sum(-1)
            if bool((acc >= limit).all()):
                break
        sums.append(acc)
    return torch.cat(sums, -1) if sums else q.new_zeros(*q.shape[:2], 0)


def band_logits(q_blk, k, i0: int, j0: int, j1: int, *, scale: float, causal: bool
                ) -> torch.Tensor:
    """Logits of query rows i0… (``q_blk``) for keys j0…j1−1, −∞ for keys after the row when
    ``causal``."""
    a = scale * (q_blk @ k[:, :, j0:j1].transpose(-1, -2))
    if causal and j1 > i0:  # keys after some row of the block
        cols = torch.arange(j0, j1, device=q_blk.device)
        rows = torch.arange(i0, i0 + q_blk.shape[2], device=q_blk.device)
        a = a.masked_fill(cols > rows[:, None], float("-inf"))
    return a


def near_band(q, k, carry_blk, i0: int, i1: int, *, scale: float, npos_max: int,
              causal: bool, block: int = DEFAULT_BLOCK) -> tuple[int, torch.Tensor]:
    """The near band of query rows i0…i1−1: (its first key j, the rows' logits for keys
    j… [b, h, i1 − i0, keys], masked). Every key before j sits at the last position for all
    of those rows, because the gates of the keys from j to the row (plus ``carry_blk``)
    already exceed npos_max − 1. Key blocks are added from the last visible key back until
    all rows have clamped, or none are left; gates are non-negative, so a clamped row stays
    clamped. Causal: the diagonal keys are always in the band (they need the mask), so the
    keys before it are visible to every row. From the fourth step on each step doubles:
    rows that clamp late (sparse gates) take a few large products instead of many small
    ones, and a band one step too wide is still exact."""
    q_blk = q[:, :, i0:i1]
    total = carry_blk.clone()
    start = i1 if causal else k.shape[2]
    band_min = i0 if causal else start
    pieces = []
    while start > 0 and (start > band_min or not bool((total > npos_max - 1).all())):
        j0 = max(0, start - block * 2 ** max(0, len(pieces) - 2))
        a = band_logits(q_blk, k, i0, j0, start, scale=scale, causal=causal)
        total += torch.sigmoid(a).sum(-1)
        pieces.append(a)
        start = j0
    band = torch.cat(pieces[::-1], dim=-1) if pieces else q.new_empty(*q_blk.shape[:3], 0)
    return start, band


def chunk_forward(q, k, v, z, zd, carry, *, scale: float, npos_max: int, causal: bool,
                  block: int = DEFAULT_BLOCK, compile: bool | None = None,
                  bands: list[int] | None = None):
    """Softmax-normalized CoPE attention of query rows over one key chunk.

    q [b, h, sq, d]; k, v [b, h, sk, d] (kv heads expanded); z, zd [b, h, sq, npos];
    carry [b, h, sq]: gate total of the row's keys after this chunk. ``causal``: the
    chunk is the rows' own (sq = sk, row i sees keys ≤ i). Returns (out, lse [b, h, sq]).

    Per query block, the near band (``near_band``) runs the CoPE block math; the
    keys before it, all at the last position, are plain attention plus the row's logit
    z[npos_max − 1], merged by log-sum-exp. ``bands``: a list to append each block's band
    start to, so that ``chunk_backward`` need not search for it again.
    """
    fwd = _kernel(_forward_block, compile, k.shape[2], q.device)
    out = torch.zeros_like(q)  # an empty softmax, for blocks with no near band
    lse = torch.full(q.shape[:3], float("-inf"), dtype=q.dtype, device=q.device)
    for i0, i1, L in _blocks(q.shape[2], k.shape[2], block, causal):
        j, band = near_band(q, k, carry[:, :, i0:i1], i0, i1, scale=scale, npos_max=npos_max,
                            causal=causal, block=block)
        if bands is not None:
            bands.append(j)
        if j < L:
            out[:, :, i0:i1], lse[:, :, i0:i1] = fwd(
                band, v[:, :, j:L], z[:, :, i0:i1], zd[:, :, i0:i1], carry[:, :, i0:i1],
                npos_max)
        if j > 0:
            far_out, far_lse = attention_with_lse(q[:, :, i0:i1], k[:, :, :j], v[:, :, :j],
                                                  scale)
            merge_softmax(out[:, :, i0:i1], lse[:, :, i0:i1], far_out,
                          far_lse + z[:, :, i0:i1, npos_max - 1])
    return out, lse


def chunk_backward(q, k, v, z, zd, carry, d_out, out, lse, grads, *, scale: float,
                   npos_max: int, causal: bool, block: int = DEFAULT_BLOCK,
                   compile: bool | None = None, bands: list[int] | None = None) -> torch.Tensor:
    """Gradients of one ``chunk_forward`` given the rows' final (merged) output and lse,
    added into ``grads`` = (dq, dk, dv, dz, dzd) (dq without the table term; dk, dv over
    the expanded heads). Returns each row's Σ_j dp_ij over the chunk.

    The keys before each block's near band are plain attention: their gates get no
    gradient (clamped positions do not move), and their logits' gradients, which all go to
    dz at the last position, need not be summed here: a softmax row's logit gradients add
    up to zero over all its keys, so each chunk subtracts its bands' sum there instead
    (``_backward_block``), and over all of a row's chunks that leaves exactly the sum over
    the keys beyond the bands. ``bands``: the band starts ``chunk_forward`` recorded (None:
    search again)."""
    dq, dk, dv, dz, dzd = grads
    bwd = _kernel(_backward_block, compile, k.shape[2], q.device)
    delta = (d_out * out).sum(-1)
    dp_sum = torch.zeros_like(lse)
    for n, (i0, i1, L) in enumerate(_blocks(q.shape[2], k.shape[2], block, causal)):
        q_blk, do_blk, out_blk, lse_blk = (t[:, :, i0:i1] for t in (q, d_out, out, lse))
        if bands is None:
            j, band = near_band(q, k, carry[:, :, i0:i1], i0, i1, scale=scale,
                                npos_max=npos_max, causal=causal, block=block)
        else:
            j = bands[n]
            band = band_logits(q_blk, k, i0, j, L, scale=scale, causal=causal)
        if j < L:
            dq_b, dk_b, dv_b, dz_b, dzd_b, dp_sum[:, :, i0:i1] = bwd(
                band, q_blk, k[:, :, j:L], v[:, :, j:L], z[:, :, i0:i1], zd[:, :, i0:i1],
                carry[:, :, i0:i1], do_blk, lse_blk, delta[:, :, i0:i1], scale, npos_max)
            dq[:, :, i0:i1] += dq_b
            dz[:, :, i0:i1] += dz_b
            dzd[:, :, i0:i1] += dzd_b
            dk[:, :, j:L] += dk_b
            dv[:, :, j:L] += dv_b
        if j > 0:
            dq_f, dk_f, dv_f = attention_backward(
                do_blk, q_blk, k[:, :, :j], v[:, :, :j], out_blk,
                lse_blk - z[:, :, i0:i1, npos_max - 1], scale)
            dq[:, :, i0:i1] += dq_f
            dk[:, :, :j] += dk_f
            dv[:, :, :j] += dv_f
    return dp_sum


def reduce_kv_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Adjoint of ``expand_kv``: [b, h, s, d] -> [b, kv_heads, s, d]."""
    b, h, s, d = t.shape
    return t.view(b, kv_heads, h // kv_heads, s, d).sum(2)


class _CoPEChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal, block, compile):
        dtype = q.dtype
        work = work_dtype(dtype)
        q, k, v, pos_emb = (t.to(work) for t in (q, k, v, pos_emb))
        h = q.shape[1]
        z = q @ pos_emb  # [b, h, s, npos]
        carry = torch.zeros(q.shape[:3], dtype=work, device=q.device)
        bands: list[int] = []
        out, lse = chunk_forward(q, expand_kv(k, h), expand_kv(v, h), z, differences(z),
                                 carry, scale=scale, npos_max=npos_max, causal=causal,
                                 block=block, compile=compile, bands=bands)
        ctx.save_for_backward(q, k, v, pos_emb, out, lse)
        ctx.cfg = (npos_max, scale, causal, block, compile, dtype, bands)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse = ctx.saved_tensors
        npos_max, scale, causal, block, compile, dtype, bands = ctx.cfg
        h, kv_heads = q.shape[1], k.shape[1]
        z = q @ pos_emb
        d_out = d_out.to(q.dtype).contiguous()
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        dq, dk, dv, dz, dzd = (torch.zeros_like(t) for t in (q, ke, ve, z, z))
        chunk_backward(q, ke, ve, z, differences(z), torch.zeros_like(lse), d_out, out, lse,
                       (dq, dk, dv, dz, dzd), scale=scale, npos_max=npos_max, causal=causal,
                       block=block, compile=compile, bands=bands)
        dq_table, d_emb = table_backward(q, pos_emb, dz, dzd)
        dq += dq_table
        dk, dv = reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)
        return (dq.to(dtype), dk.to(dtype), dv.to(dtype), d_emb.to(dtype),
                None, None, None, None, None)


def cope_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_emb: torch.Tensor,
    *,
    npos_max: int,
    softmax_scale: float,
    causal: bool = True,
    block: int = DEFAULT_BLOCK,
    compile: bool | None = None,
) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d]; pos_emb [h or 1, d, npos] -> [b, h, s, d].

    ``compile``: fuse the block math with torch.compile; None: from ``COMPILE_MIN_SEQ`` tokens
    on, when the compiler toolchain is present.
    """
    return _CoPEChunked.apply(q, k, v, pos_emb, npos_max, softmax_scale, causal, block, compile)
