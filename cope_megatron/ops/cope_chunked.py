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
    dp  = dfrac where p < npos_max − 1 (clamp);      dg = cumsum(dp)  (revcumsum's adjoint)
    da  = dL/d(a+b) + dg ⊙ g ⊙ (1 − g)
z = q·E and its gradients (dq += dz·Eᵀ, dE = qᵀ·dz) are done once for the whole sequence.
"""

from __future__ import annotations

import torch

from cope_megatron.ops.cope_reference import expand_kv, reverse_cumsum

DEFAULT_BLOCK = 128


def _block_logits(q_blk, k_blk, z_blk, i0, scale, npos_max, causal):
    """Recomputable forward of one query block against keys [0, L).

    Returns logits a (masked), gates g, clamped positions p, floor index, ceil index,
    frac, and the combined logits a + b.
    """
    a = scale * (q_blk @ k_blk.transpose(-1, -2))  # [b, h, B, L]
    if causal:
        rows = torch.arange(i0, i0 + q_blk.shape[2], device=a.device)[:, None]
        cols = torch.arange(k_blk.shape[2], device=a.device)[None, :]
        a = a.masked_fill(cols > rows, float("-inf"))
    g = torch.sigmoid(a)
    p_raw = reverse_cumsum(g)
    p = p_raw.clamp(max=npos_max - 1)
    lo_f = p.floor()
    frac = p - lo_f
    lo = lo_f.long()
    hi = p.ceil().long()
    z_lo, z_hi = z_blk.gather(-1, lo), z_blk.gather(-1, hi)
    logits = a + frac * z_hi + (1 - frac) * z_lo
    return a, g, p_raw, lo, hi, frac, z_lo, z_hi, logits


class _CoPEChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_emb, npos_max, scale, causal, block):
        b, h, s, d = q.shape
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        z = q @ pos_emb  # [b, h, s, npos]
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
                          device=q.device)
        for i0 in range(0, s, block):
            i1 = min(s, i0 + block)
            L = i1 if causal else s
            *_, logits = _block_logits(q[:, :, i0:i1], ke[:, :, :L], z[:, :, i0:i1], i0, scale,
                                       npos_max, causal)
            m = torch.logsumexp(logits.float() if q.dtype != torch.float64 else logits, dim=-1)
            probs = torch.exp(logits - m[..., None].to(logits.dtype))
            out[:, :, i0:i1] = probs @ ve[:, :, :L]
            lse[:, :, i0:i1] = m
        ctx.save_for_backward(q, k, v, pos_emb, out, lse)
        ctx.cfg = (npos_max, scale, causal, block)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, pos_emb, out, lse = ctx.saved_tensors
        npos_max, scale, causal, block = ctx.cfg
        b, h, s, d = q.shape
        g_heads = k.shape[1]
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        z = q @ pos_emb
        d_out = d_out.contiguous()
        delta = (d_out * out).sum(-1)  # [b, h, s]
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(ke)
        dv = torch.zeros_like(ve)
        dz = torch.zeros_like(z)
        for i0 in range(0, s, block):
            i1 = min(s, i0 + block)
            L = i1 if causal else s
            q_blk, k_blk = q[:, :, i0:i1], ke[:, :, :L]
            _, g, p_raw, lo, hi, frac, z_lo, z_hi, logits = _block_logits(
                q_blk, k_blk, z[:, :, i0:i1], i0, scale, npos_max, causal)
            probs = torch.exp(logits - lse[:, :, i0:i1, None].to(logits.dtype))
            do_blk = d_out[:, :, i0:i1]
            dv[:, :, :L] += probs.transpose(-1, -2) @ do_blk
            dlogits = probs * (do_blk @ ve[:, :, :L].transpose(-1, -2)
                               - delta[:, :, i0:i1, None])
            dz_blk = dz[:, :, i0:i1]
            dz_blk.scatter_add_(-1, hi, dlogits * frac)
            dz_blk.scatter_add_(-1, lo, dlogits * (1 - frac))
            dp = torch.where(p_raw <= npos_max - 1, dlogits * (z_hi - z_lo), 0.0)
            # Masked keys have P = 0 and g = 0, so their da is exactly 0.
            da = dlogits + dp.cumsum(-1) * g * (1 - g)
            dq[:, :, i0:i1] += scale * (da @ k_blk)
            dk[:, :, :L] += scale * (da.transpose(-1, -2) @ q_blk)
        dq += dz @ pos_emb.transpose(-1, -2)
        d_emb = q.transpose(-1, -2) @ dz  # [b, h, d, npos]
        d_emb = d_emb.sum(0) if pos_emb.shape[0] == h else d_emb.sum((0, 1))[None]
        rep = h // g_heads
        dk = dk.view(b, g_heads, rep, s, d).sum(2)
        dv = dv.view(b, g_heads, rep, s, d).sum(2)
        return dq, dk, dv, d_emb, None, None, None, None


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
) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d]; pos_emb [h or 1, d, npos] -> [b, h, s, d]."""
    return _CoPEChunked.apply(q, k, v, pos_emb, npos_max, softmax_scale, causal, block)
