"""Memory-efficient exact CoPE on any device: a near band of CoPE math per row, plain
attention beyond it, recomputed in backward.

CoPE's position of key j for query i, p_ij = Σ_{t=j..i} σ(a_it), is a reverse cumulative
sum along the key axis, so FlashAttention's key tiling does not apply to it directly. But
gates are non-negative, so going back from the query the sum only grows, and once it
passes npos_max − 1 every farther key sits at the last position: its position logit is
the row's constant z_i[npos_max − 1] and its gate gets no gradient. Those keys are plain
attention with one logit added per row, which PyTorch's fused flash kernel does at its own
speed (``ops.plain_attention``); the two parts merge by log-sum-exp.

The split is one width W per group of ``FAR_ROWS`` rows (``WIDE_ROWS`` for the first group
and once bands are wide): row i runs CoPE's math over keys
i − W < j ≤ i (its band) and plain attention over j ≤ i − W, so the plain part of a group
is one rectangle and one top-left causal triangle, two large flash calls. W is the widest
band any row of the group needs, found at run time: the forward tries the previous group's
need plus an eighth; where some row has not clamped within it, it tries again at least
twice as wide, as far as that row's gates so far extrapolate. It records each group's
exact need, with which the backward recomputes. Sparse gates widen W up to the whole row;
then no plain part is left and the op is CoPE's math throughout.

The band runs in batches (``_bands``): narrow bands as query blocks of ``block`` rows, each
against a copied window of W + block − 1 keys masked to its rows' bands; wide ones as one
larger block whose window is a view. ``ops.cope.blocks`` has their math in torch,
``ops.cope.native`` as the CPU's C++ kernel; ``ops.cope.paths`` picks per device. Only q,
k, v, the table, the output and one log-sum-exp per row are saved.

The same code serves one (query chunk, key chunk) pair of a sequence split across ranks
(``chunk_forward``/``chunk_backward``, used by ``ops.context_parallel.cope``): ``carry`` adds to
every row's positions the gate total of the keys after the chunk, the forward returns the
log-sum-exp for merging partial softmaxes, and the backward returns each row's Σ dp, the
carry the adjoint needs into later chunks. A key chunk before the query chunk has no mask:
its band is its last W keys for every row (W = 0 when the carry has clamped every row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cope_megatron.ops.cope.blocks import kernels
from cope_megatron.ops.cope.paths import Paths
from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype
from cope_megatron.ops.plain_attention import (
    attention_backward,
    attention_with_lse,
    merge_softmax,
)

# Narrow bands' rows per block: a larger block copies fewer key windows and masks more
# keys; on CPU 128 ran 5-15% faster than 32 at 1k-4k tokens (dense gates).
DEFAULT_BLOCK = 128
FAR_ROWS = 1024  # the CPU flash kernel tiles queries by 256 from 768 rows on
BAND_ELEMENTS = 3 * 2**18
MIN_BAND_ROWS = 128
MIN_WIDE_ROWS = 32
WIDE_BAND = 512
WIDE_ROWS = 256



class _Band:
    """Heads ``heads`` and query rows r0…r1−1 as blocks [b, h, n, B, ·] against key windows
    [b, h, n, L, ·]. Causal: block n's rows i0… see keys from max(0, i0 − W + 1) on,
    masked to each row's band i − W < j ≤ i; otherwise one block of all rows against the
    chunk's last W keys."""

    def __init__(self, heads: slice, r0: int, r1: int, width: int, block: int, causal: bool,
                 keys: int, device: torch.device):
        self.heads, self.r0, self.r1, self.width, self.causal = heads, r0, r1, width, causal
        if not causal:
            block = r1 - r0
        self.rows_per, self.count = min(block, r1 - r0), -(-(r1 - r0) // block)
        if causal:
            first = max(0, r0 - width + 1)
            span = min(width + self.rows_per - 1, r0 + self.rows_per * self.count)
            ends = r0 + self.rows_per * torch.arange(1, self.count + 1, device=device)
            starts = (ends - self.rows_per - width + 1).clamp(min=0)
        else:
            first, span = keys - width, width
            starts = torch.tensor([first], device=device)
        self.key = starts[:, None] + torch.arange(span, device=device)  # [n, L]
        self.index = self.key.clamp(max=keys - 1).flatten()  # keys past the end are masked
        # One block's window is a range of keys: a view, not a copy.
        self.range = slice(first, first + span) if self.count == 1 else None
        self.ids = (torch.arange(self.count * self.rows_per, device=device) + r0).view(
            self.count, self.rows_per)  # each block row's index (past r1: padding)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """[b, h, s, ...] -> [b, h', n, B, ...], rows past r1 zero."""
        x = t[:, self.heads, self.r0:self.r1]
        pad = self.count * self.rows_per - x.shape[2]
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.unflatten(2, (self.count, self.rows_per))

    def put(self, t: torch.Tensor, blocks: torch.Tensor, add: bool = False) -> None:
        """t's rows [b, h, s, ...] = (or +=) the blocks [b, h', n, B, ...]."""
        rows = blocks.flatten(2, 3)[:, :, :self.r1 - self.r0]
        if add:
            t[:, self.heads, self.r0:self.r1] += rows
        else:
            t[:, self.heads, self.r0:self.r1] = rows

    def windows(self, t: torch.Tensor) -> torch.Tensor:
        """Keys [b, h, sk, d] -> [b, h', n, L, d]."""
        if self.range is not None:
            return t[:, self.heads, self.range, None].transpose(2, 3)
        return t[:, self.heads].index_select(2, self.index).unflatten(2, self.key.shape)

    def add_windows(self, acc: torch.Tensor, win: torch.Tensor) -> None:
        """acc [b, h, sk, d] += the windows' gradients [b, h', n, L, d] (masked keys': 0)."""
        if self.range is not None:
            acc[:, self.heads, self.range] += win[:, :, 0]
        else:
            acc[:, self.heads].index_add_(2, self.index, win.flatten(2, 3))

    def mask(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """``cope_blocks``' band: row and key indices and W (None: every key is the row's)."""
        return (self.ids, self.key, self.width) if self.causal else None


def _bands(r0: int, r1: int, width: int, block: int, causal: bool, keys: int, shape,
           device: torch.device, thread_heads: bool):
    """The group's band in batches of about ``BAND_ELEMENTS`` logits and copied window
    elements. Narrow bands: blocks of ``block`` rows and all heads, each window a copy;
    wide ones (sparse gates, W ≥ ``WIDE_BAND``): one block of rows (``MIN_BAND_ROWS`` where
    the budget allows, never under ``MIN_WIDE_ROWS``) of fewer heads, whose window is a
    view and whose extra masked keys are few beside W."""
    batch, heads, _, dim = shape
    if causal and width < WIDE_BAND:
        per_row = (width + block - 1) * (1 + 2 * dim / block)  # logits, k and v windows
        head_step = heads
        rows = max(block, int(BAND_ELEMENTS // (batch * heads * per_row)) // block * block)
    else:
        budget = max(1, BAND_ELEMENTS // (batch * width))
        head_step = max(1, min(heads, budget // MIN_BAND_ROWS)) if causal else heads
        if head_step < heads and thread_heads:
            # A multiple of the threads, even if the rows get fewer: CPU matmuls split the
            # batch among them (one head × 192 rows runs 1.6× faster on two threads, two
            # heads × 96 rows 1.9×).
            threads = min(torch.get_num_threads(), heads)
            head_step = max(threads, head_step // threads * threads)
        rows = block = max(MIN_WIDE_ROWS if causal else 1, budget // head_step)
    for h0 in range(0, heads, head_step):
        for s0 in range(r0, r1, rows):
            yield _Band(slice(h0, h0 + head_step), s0, min(r1, s0 + rows), width, block,
                        causal, keys, device)


def _far_parts(r0: int, r1: int, width: int, keys: int, causal: bool):
    """(first row, end row, first key, end key, causal) of the plain-attention calls that
    give rows r0…r1−1 their keys j ≤ i − W (causal) or j < keys − W."""
    if not causal:
        if width < keys:
            yield r0, r1, 0, keys - width, False
        return
    c = r0 - width + 1
    if c > 0:  # keys before every row's band
        yield r0, r1, 0, c, False
    c = max(c, 0)
    first = max(r0, c + width)  # row i ≥ first also has keys c … i − W
    if first < r1:
        yield first, r1, c, r1 - width, True


def all_clamped(carry: torch.Tensor, npos_max: int) -> bool:
    """Whether the gates of the keys after the chunk clamp every row of ``carry``: then
    every key of the chunk sits at the last position, and the rows are plain attention
    with no band (and nothing for dz)."""
    return bool((carry > npos_max - 1).all())


def _next_width(need: int, limit: int) -> float:
    """The next group's first try: this one's need and an eighth, in steps of 8; all its
    keys if a row here never clamped (sparse gates)."""
    return math.inf if need >= limit else -(-(need + need // 8 + 1) // 8) * 8


def _band_forward(fwd, q, k, v, z, carry, out, lse, totals, r0, r1, width, *, scale,
                  npos_max, causal, block, thread_heads) -> tuple[int, int]:
    """The group's band into out, lse. Returns the widest band a row of it needs, its keys
    up to the first one past npos_max − 1 (0 if the carry has clamped the row, all its keys
    if it never clamps), and, if that is more than ``width``, a width likely to do: where a
    row has not clamped, its gates so far, extrapolated."""
    need, guess, work = 0, width, z.dtype
    for band in _bands(r0, r1, width, block, causal, k.shape[2], q.shape, q.device,
                       thread_heads):
        carry_rows, ids = band.rows(carry), band.ids
        o, o_lse, unclamped, total = fwd(band.rows(q).to(work), band.windows(k).to(work),
                                         band.windows(v).to(work), band.mask(), band.rows(z),
                                         carry_rows, scale, npos_max)
        band.put(out, o)
        band.put(lse, o_lse)
        if totals is not None:
            band.put(totals, total)
        # Keys past npos_max − 1 are the far ones, so a row needs its unclamped keys; if
        # all of its band is unclamped and it has keys beyond, it needs more than W.
        more = ids + 1 > width if causal else k.shape[2] > width
        row_need = unclamped + ((unclamped >= width) & more)
        row_need = row_need.masked_fill(ids >= band.r1, 0)
        need = max(need, int(row_need.max()))
        short = row_need > width
        if bool(short.any()):
            rate = (total - carry_rows)[short] / width  # gate mass per key
            left = (npos_max - 1 - carry_rows)[short]
            guess = max(guess, int((1.25 * left / rate.clamp(min=1e-6)).max()))
    return need, guess


def chunk_forward(q, k, v, z, carry, *, scale: float, npos_max: int, causal: bool,
                  block: int = DEFAULT_BLOCK, paths: Paths | None = None,
                  bands: list[tuple[int, int, int]] | None = None,
                  totals: torch.Tensor | None = None):
    """Softmax-normalized CoPE attention of query rows over one key chunk.

    q [b, h, sq, d]; k, v [b, h, sk, d] (kv heads expanded); z = q·E [b, h, sq, npos];
    carry [b, h, sq]: gate total of the row's keys after this chunk. ``causal``: the
    chunk is the rows' own (sq = sk, row i sees keys ≤ i). Returns (out, lse [b, h, sq]).
    ``bands``: a list to append each group's (first row, end row, band width) to, for
    ``chunk_backward``. ``paths``: the device-dependent choices (``ops.cope.paths``).
    ``totals`` [b, h, sq], if given, receives each row's carry plus its gate total over the
    chunk, exact below npos_max − 1 and at least that otherwise (as the CP op's
    ``gate_sums`` gives): a row's band holds all its keys up to its clamp, so the total
    comes with the band.
    z and carry are in the dtype the math runs in; q, k, v may be narrower (bf16), then
    each band and plain-attention call converts only its own part, and out and lse
    accumulate in z's dtype.
    """
    paths = (paths or Paths()).resolve(q.device, k.shape[2])
    fwd, _ = kernels(paths.band)
    work = z.dtype
    out = torch.zeros(q.shape, dtype=work, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)
    width = 2 * npos_max + npos_max // 2  # gates about one half clamp within 2·npos_max
    r0 = 0
    while r0 < q.shape[2]:
        # The first group finds the width, so a second try there is cheap; wide bands also
        # in small groups: one row that never clamps widens only its own.
        small = r0 == 0 or width >= WIDE_BAND
        r1 = min(q.shape[2], r0 + (WIDE_ROWS if small else FAR_ROWS))
        limit = r1 if causal else k.shape[2]
        width = min(width, limit)
        if all_clamped(carry[:, :, r0:r1], npos_max):
            width = need = 0  # later chunks clamped every row: all plain
            if totals is not None:
                totals[:, :, r0:r1] = carry[:, :, r0:r1]
        while width:
            need, guess = _band_forward(fwd, q, k, v, z, carry, out, lse, totals, r0, r1,
                                        width, scale=scale, npos_max=npos_max,
                                        causal=causal, block=block,
                                        thread_heads=paths.thread_heads)
            if need <= width:
                break
            width = min(max(2 * width, guess), limit)
        for i0, i1, j0, j1, tri in _far_parts(r0, r1, width, k.shape[2], causal):
            far_out, far_lse = attention_with_lse(
                q[:, :, i0:i1].to(work), k[:, :, j0:j1].to(work), v[:, :, j0:j1].to(work),
                scale, tri, flash=paths.far == "flash")
            merge_softmax(out[:, :, i0:i1], lse[:, :, i0:i1], far_out,
                          far_lse + z[:, :, i0:i1, npos_max - 1])
            del far_out, far_lse  # not alive while the next part's are made
        if bands is not None:
            bands.append((r0, r1, need))
        width, r0 = _next_width(need, limit), r1
    return out, lse


def chunk_backward(q, k, v, z, carry, d_out, out, lse, grads, *, scale: float,
                   npos_max: int, causal: bool, bands: list[tuple[int, int, int]],
                   block: int = DEFAULT_BLOCK, paths: Paths | None = None) -> torch.Tensor:
    """Gradients of one ``chunk_forward`` given the rows' final (merged) output and lse,
    added into ``grads`` = (dq, dk, dv, dz) (dq without the table term; dk, dv over
    the expanded heads). Returns each row's Σ_j dp_ij over the chunk.

    The plain keys' gates get no gradient (clamped positions do not move), and their
    logits' gradients, which all go to dz at the last position, need not be summed: a
    softmax row's logit gradients add up to zero over all its keys, so each band subtracts
    its own sum there instead (``cope_blocks.backward_block``), and over all of a row's
    chunks that leaves exactly the sum over its plain keys. ``bands``: the widths
    ``chunk_forward`` recorded. q, k, v as there; d_out, out, lse and ``grads`` in z's
    dtype; dz may be None where no band was recorded (every row clamped)."""
    paths = (paths or Paths()).resolve(q.device, k.shape[2])
    _, bwd = kernels(paths.band)
    work = z.dtype
    delta = (d_out * out).sum(-1)
    dp_sum = torch.zeros_like(lse)
    for r0, r1, width in bands:
        bands_here = _bands(r0, r1, width, block, causal, k.shape[2], q.shape,
                            q.device, paths.thread_heads) if width else ()
        for band in bands_here:
            _band_backward(bwd, band, q, k, v, z, carry, d_out, lse, delta, grads, dp_sum,
                           scale=scale, npos_max=npos_max)
        for i0, i1, j0, j1, tri in _far_parts(r0, r1, width, k.shape[2], causal):
            parts = attention_backward(
                d_out[:, :, i0:i1], q[:, :, i0:i1].to(work), k[:, :, j0:j1].to(work),
                v[:, :, j0:j1].to(work), out[:, :, i0:i1],
                lse[:, :, i0:i1] - z[:, :, i0:i1, npos_max - 1], scale, tri,
                flash=paths.far == "flash")
            for g, first, end, part in zip(grads, (i0, j0, j0), (i1, j1, j1), parts):
                g[:, :, first:end] += part
            del parts, part  # not alive while the next part's are made
    return dp_sum


def _band_backward(bwd, band, q, k, v, z, carry, d_out, lse, delta, grads, dp_sum, *,
                   scale: float, npos_max: int) -> None:
    """One band's gradients added into ``grads`` and its Σ dp into ``dp_sum``; a function
    of its own so that the band's gradient blocks are freed before the next band's."""
    dq, dk, dv, dz = grads
    work = z.dtype
    dq_b, dk_w, dv_w, dz_b, dps = bwd(
        band.rows(q).to(work), band.windows(k).to(work), band.windows(v).to(work),
        band.mask(), band.rows(z), band.rows(carry), band.rows(d_out), band.rows(lse),
        band.rows(delta), scale, npos_max)
    band.put(dq, dq_b, add=True)
    band.put(dz, dz_b, add=True)
    band.put(dp_sum, dps)
    band.add_windows(dk, dk_w)
    band.add_windows(dv, dv_w)


def table_backward(q: torch.Tensor, pos_emb: torch.Tensor, dz: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients through z = q·E: (the dq term, dE), from the accumulated dz."""
    d_emb = q.transpose(-1, -2) @ dz  # [b, h, d, npos]
    d_emb = d_emb.sum(0) if pos_emb.shape[0] == q.shape[1] else d_emb.sum((0, 1))[None]
    return dz @ pos_emb.transpose(-1, -2), d_emb



class _CoPEChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal, block, paths):
        dtype = q.dtype
        work = work_dtype(dtype)
        # Detached: the compiled band code is specialized on requires_grad.
        q, k, v, pos_emb = (t.detach().to(work) for t in (q, k, v, pos_emb))
        h = q.shape[1]
        z = q @ pos_emb  # [b, h, s, npos]
        carry = torch.zeros(q.shape[:3], dtype=work, device=q.device)
        bands: list[tuple[int, int, int]] = []
        out, lse = chunk_forward(q, expand_kv(k, h), expand_kv(v, h), z, carry, scale=scale,
                                 npos_max=npos_max, causal=causal, block=block,
                                 paths=paths, bands=bands)
        ctx.save_for_backward(q, k, v, pos_emb, out, lse)
        ctx.cfg = (npos_max, scale, causal, block, paths, dtype, bands)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse = ctx.saved_tensors
        npos_max, scale, causal, block, paths, dtype, bands = ctx.cfg
        h, kv_heads = q.shape[1], k.shape[1]
        z = q @ pos_emb
        d_out = d_out.to(q.dtype).contiguous()
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        dq, dk, dv, dz = (torch.zeros_like(t) for t in (q, ke, ve, z))
        chunk_backward(q, ke, ve, z, torch.zeros_like(lse), d_out, out, lse,
                       (dq, dk, dv, dz), scale=scale, npos_max=npos_max, causal=causal,
                       block=block, paths=paths, bands=bands)
        dq_table, d_emb = table_backward(q, pos_emb, dz)
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
    paths: Paths | None = None,
) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d]; pos_emb [h or 1, d, npos] -> [b, h, s, d].

    ``block``: query rows per band block. ``paths``: which band math and plain-attention
    code run (``ops.cope.paths``; None: what the device runs by default).
    """
    return _CoPEChunked.apply(q, k, v, pos_emb, npos_max, softmax_scale, causal, block, paths)
