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

The per-block math is mostly elementwise passes; ``torch.compile`` fuses them (about 3×
faster on CPU, see bench/cope_op.py). Compilation costs seconds once per process, so it is
used from ``COMPILE_MIN_SEQ`` tokens on, where it pays for itself.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch

from cope_megatron.ops.cope_reference import expand_kv, reverse_cumsum

DEFAULT_BLOCK = 128
COMPILE_MIN_SEQ = 1024


def _recompute(q_blk, k_blk, z_blk, zd_blk, i0: int, scale: float, npos_max: int,
               causal: bool):
    a = scale * (q_blk @ k_blk.transpose(-1, -2))  # [b, h, B, L]
    if causal:
        rows = torch.arange(q_blk.shape[2], device=a.device)[:, None] + i0
        cols = torch.arange(k_blk.shape[2], device=a.device)[None, :]
        a = a.masked_fill(cols > rows, float("-inf"))
    g = torch.sigmoid(a)
    p_raw = reverse_cumsum(g)
    p = p_raw.clamp(max=npos_max - 1)
    lo_f = p.floor()
    frac = p - lo_f
    lo = lo_f.long()
    # z⌊p⌋ + frac·(z⌈p⌉ − z⌊p⌋), with zd[n] = z[n+1] − z[n]: one index instead of two (at
    # integer p, frac = 0 and the difference term vanishes).
    zd_lo = zd_blk.gather(-1, lo)
    logits = a + z_blk.gather(-1, lo) + frac * zd_lo
    return g, p_raw, lo, frac, zd_lo, logits


def _forward_block(q_blk, k_blk, v_blk, z_blk, zd_blk, i0: int, scale: float, npos_max: int,
                   causal: bool):
    *_, logits = _recompute(q_blk, k_blk, z_blk, zd_blk, i0, scale, npos_max, causal)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - lse[..., None]) @ v_blk, lse


def _backward_block(q_blk, k_blk, v_blk, z_blk, zd_blk, do_blk, lse_blk, delta_blk, i0: int,
                    scale: float, npos_max: int, causal: bool):
    g, p_raw, lo, frac, zd_lo, logits = _recompute(
        q_blk, k_blk, z_blk, zd_blk, i0, scale, npos_max, causal)
    probs = torch.exp(logits - lse_blk[..., None])
    dv = probs.transpose(-1, -2) @ do_blk
    dlogits = probs * (do_blk @ v_blk.transpose(-1, -2) - delta_blk[..., None])
    dz = torch.zeros_like(z_blk).scatter_add_(-1, lo, dlogits)
    dzd = torch.zeros_like(z_blk).scatter_add_(-1, lo, dlogits * frac)
    dp = torch.where(p_raw <= npos_max - 1, dlogits * zd_lo, 0.0)
    # Masked keys have P = 0 and g = 0, so their da is exactly 0.
    da = dlogits + dp.cumsum(-1) * g * (1 - g)
    return scale * (da @ k_blk), scale * (da.transpose(-1, -2) @ q_blk), dv, dz, dzd


def _differences(z: torch.Tensor) -> torch.Tensor:
    """zd[n] = z[n+1] − z[n], zero at the last entry."""
    return torch.nn.functional.pad(z[..., 1:] - z[..., :-1], (0, 1))


def _undo_differences(dz: torch.Tensor, dzd: torch.Tensor) -> torch.Tensor:
    """Adjoint of z ↦ (z, zd): dz[n] += dzd[n−1] − dzd[n] (the padded last zd has none)."""
    dzd = dzd[..., :-1]
    return dz + torch.nn.functional.pad(dzd, (1, 0)) - torch.nn.functional.pad(dzd, (0, 1))


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


def _kernels(compile: bool):
    if compile:
        return _compiled(_forward_block), _compiled(_backward_block)
    return _forward_block, _backward_block


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32: the gate sums and softmax need it."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _CoPEChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal, block, compile):
        dtype = q.dtype
        work = _work_dtype(dtype)
        q, k, v, pos_emb = (t.to(work) for t in (q, k, v, pos_emb))
        b, h, s, d = q.shape
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        z = q @ pos_emb  # [b, h, s, npos]
        zd = _differences(z)
        fwd, _ = _kernels(compile)
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, dtype=work, device=q.device)
        for i0 in range(0, s, block):
            i1 = min(s, i0 + block)
            L = i1 if causal else s
            out[:, :, i0:i1], lse[:, :, i0:i1] = fwd(
                q[:, :, i0:i1], ke[:, :, :L], ve[:, :, :L], z[:, :, i0:i1], zd[:, :, i0:i1], i0,
                scale, npos_max, causal)
        ctx.save_for_backward(q, k, v, pos_emb, out, lse)
        ctx.cfg = (npos_max, scale, causal, block, compile, dtype)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse = ctx.saved_tensors
        npos_max, scale, causal, block, compile, dtype = ctx.cfg
        b, h, s, d = q.shape
        kv_heads = k.shape[1]
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        z = q @ pos_emb
        zd = _differences(z)
        d_out = d_out.to(q.dtype).contiguous()
        delta = (d_out * out).sum(-1)  # [b, h, s]
        _, bwd = _kernels(compile)
        dq, dk, dv, dz, dzd = (torch.zeros_like(t) for t in (q, ke, ve, z, z))
        for i0 in range(0, s, block):
            i1 = min(s, i0 + block)
            L = i1 if causal else s
            dq[:, :, i0:i1], dk_blk, dv_blk, dz[:, :, i0:i1], dzd[:, :, i0:i1] = bwd(
                q[:, :, i0:i1], ke[:, :, :L], ve[:, :, :L], z[:, :, i0:i1], zd[:, :, i0:i1],
                d_out[:, :, i0:i1], lse[:, :, i0:i1], delta[:, :, i0:i1], i0, scale, npos_max,
                causal)
            dk[:, :, :L] += dk_blk
            dv[:, :, :L] += dv_blk
        dz = _undo_differences(dz, dzd)
        dq += dz @ pos_emb.transpose(-1, -2)
        d_emb = q.transpose(-1, -2) @ dz  # [b, h, d, npos]
        d_emb = d_emb.sum(0) if pos_emb.shape[0] == h else d_emb.sum((0, 1))[None]
        rep = h // kv_heads
        dk = dk.view(b, kv_heads, rep, s, d).sum(2)
        dv = dv.view(b, kv_heads, rep, s, d).sum(2)
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
    if compile is None:
        compile = q.shape[2] >= COMPILE_MIN_SEQ and _can_compile(q.device)
    return _CoPEChunked.apply(q, k, v, pos_emb, npos_max, softmax_scale, causal, block, compile)
