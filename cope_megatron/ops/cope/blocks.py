"""CoPE's math on a batch of query blocks against their key windows, forward and backward:
the part of exact CoPE that is not plain attention (``ops.cope.chunked`` decides which
keys that is).

Shapes: q blocks [..., n, B, d] for B rows, k and v windows [..., n, L, d] of L keys
each, per-row z [..., n, B, npos] and carry [..., n, B]; ``band`` = (row indices [n, B],
key indices [n, L], W): key j is row i's if i − W < j ≤ i (None: every key is).
With a = scale·q·kᵀ, g = σ(a), p = revcumsum(g) + carry, b the position logits and
P = softmax(a + b):
    dL/d(a+b) = P ⊙ (dP − Δ),  Δ = rowsum(dO ⊙ O)                     (softmax)
    db  → dz at ⌊p⌋, ⌈p⌉ with weights 1−frac, frac;  dfrac = db ⊙ (z⌈p⌉ − z⌊p⌋)
          (computed as b = z[⌊p⌋] + frac·zd[⌊p⌋] with zd the differences of z: one
          index instead of two; at integer p, frac = 0 and the difference term vanishes)
    dp  = dfrac where p ≤ npos_max − 1 (clamp);      dg = cumsum(dp)  (revcumsum's adjoint)
    da  = dL/d(a+b) + dg ⊙ g ⊙ (1 − g)

These are the math in torch: eagerly, the reference for the fused versions: the C++ kernel
of ``ops.cope.native`` (same arguments, same results) and these functions through
``torch.compile``, which fuses their elementwise passes (``ops.cope.paths`` picks one).
"""

from __future__ import annotations

import functools

import torch

from cope_megatron.ops.cope import native as cope_native
from cope_megatron.ops.cope.paths import Band


@torch.library.custom_op("cope_megatron::reverse_cumsum", mutates_args=())
def reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """y_j = Σ_{t ≥ j} x_t along the last dim, opaque to the compiler: fused, the flips
    become element-by-element reversed reads (about a third of the backward's time on
    CPU); here they are aten's vectorized copies around one cumsum."""
    return x.flip(-1).cumsum(-1).flip(-1)


@reverse_cumsum.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _keep(band):
    """[n, B, L]: which keys are each row's. Built here, inside the fused code, from the
    indices: a mask tensor read alongside costs about a third of the forward on CPU."""
    rows, keys, width = band
    rows, keys = rows[..., None], keys[:, None, :]
    return (keys <= rows) & (keys > rows - width)


def _recompute(q_blk, k_win, band, z_blk, carry_blk, scale: float, npos_max: int):
    """Logits, gates, raw positions, interpolation terms and the full logits of a band."""
    a = scale * (q_blk @ k_win.transpose(-1, -2))
    if band is not None:
        a = a.masked_fill(~_keep(band), float("-inf"))
    g = torch.sigmoid(a)  # masked keys: σ(−∞) = 0
    p_raw = reverse_cumsum(g) + carry_blk[..., None]
    p = p_raw.clamp(max=npos_max - 1)
    lo_f = p.floor()
    frac = p - lo_f
    lo = lo_f.long().clamp(min=0)  # NaN (a diverged run): entry 0, and the row is NaN
    zd_lo = differences(z_blk).gather(-1, lo)
    logits = a + z_blk.gather(-1, lo) + frac * zd_lo
    return g, p_raw, lo, frac, zd_lo, logits


def forward_block(q_blk, k_win, v_win, band, z_blk, carry_blk, scale: float, npos_max: int):
    """(out [..., B, d], lse [..., B], unclamped [..., B], total [..., B]): the band's
    softmax, how many of each row's keys have positions at or below npos_max − 1, and the
    row's gate total over the window plus its carry."""
    _, p_raw, *_, logits = _recompute(q_blk, k_win, band, z_blk, carry_blk, scale, npos_max)
    lse = torch.logsumexp(logits, dim=-1)
    unclamped = p_raw <= npos_max - 1
    if band is not None:
        unclamped = unclamped & _keep(band)
    # Masked keys add no gate, so the first key's raw position is the row's total.
    return torch.exp(logits - lse[..., None]) @ v_win, lse, unclamped.sum(-1), p_raw[..., 0]


def backward_block(q_blk, k_win, v_win, band, z_blk, carry_blk, do_blk, lse_blk, delta_blk,
                   scale: float, npos_max: int):
    """(dq, dk_win, dv_win, dz, Σ dp per row) of a band, given the rows' lse and Δ over
    all their keys."""
    g, p_raw, lo, frac, zd_lo, logits = _recompute(q_blk, k_win, band, z_blk, carry_blk,
                                                   scale, npos_max)
    probs = torch.exp(logits - lse_blk[..., None])
    dv = probs.transpose(-1, -2) @ do_blk
    dlogits = probs * (do_blk @ v_win.transpose(-1, -2) - delta_blk[..., None])
    dz = torch.zeros_like(z_blk).scatter_add_(-1, lo, dlogits)
    dzd = torch.zeros_like(z_blk).scatter_add_(-1, lo, dlogits * frac)
    dp = torch.where(p_raw <= npos_max - 1, dlogits * zd_lo, 0.0)
    dp_cum = dp.cumsum(-1)
    # Masked keys have P = 0 and g = 0, so their da is exactly 0.
    da = dlogits + dp_cum * g * (1 - g)
    # A row's logit gradients sum to zero over all its keys (softmax), so the keys beyond
    # the band, all at the last position, add −Σ_band to dz there.
    dz[..., npos_max - 1] -= dlogits.sum(-1)
    return (scale * (da @ k_win), scale * (da.transpose(-1, -2) @ q_blk), dv,
            undo_differences(dz, dzd), dp_cum[..., -1])


def differences(z: torch.Tensor) -> torch.Tensor:
    """zd[n] = z[n+1] − z[n], zero at the last entry."""
    return torch.nn.functional.pad(z[..., 1:] - z[..., :-1], (0, 1))


def undo_differences(dz: torch.Tensor, dzd: torch.Tensor) -> torch.Tensor:
    """Adjoint of z ↦ (z, zd): dz[n] += dzd[n−1] − dzd[n] (the padded last zd has none)."""
    dzd = dzd[..., :-1]
    return dz + torch.nn.functional.pad(dzd, (1, 0)) - torch.nn.functional.pad(dzd, (0, 1))


@functools.cache
def compile_block(fn):
    """``fn`` (a band block's forward or backward) under torch.compile, once per function;
    also the stick-breaking op's."""
    compiled = torch.compile(fn, dynamic=True)
    # Without this, dynamo equates sizes that merely coincide in the first call (block
    # rows = window keys, offsets = sizes) and recompiles whenever they differ later,
    # until it gives up and runs eagerly. Made once: each patch() builds a class.
    distinct_sizes = torch.fx.experimental._config.patch(use_duck_shape=False)

    @functools.wraps(fn)
    def call(*args):
        with distinct_sizes:
            return compiled(*args)

    return call


def kernels(band: Band):
    """(forward, backward) band functions: these, eagerly; the C++ kernel of
    ``ops.cope.native``; or these through torch.compile (``ops.cope.paths`` says which
    a device runs)."""
    if band == "native":
        return cope_native.forward_block, cope_native.backward_block
    if band == "compiled":
        return compile_block(forward_block), compile_block(backward_block)
    return forward_block, backward_block
