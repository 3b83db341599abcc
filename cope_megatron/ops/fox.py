"""Forgetting attention (FoX: Lin et al., ICLR 2025, arXiv 2503.02130), exactly.

    fox_attention(q, k, v, log_f, softmax_scale=None, impl="auto", flash=None)
        -> [batch, heads, seq, head_dim]

Per head, with log f_t ≤ 0 the log forget gate of token t (``log_f`` [b, h, s], one per
query head) and F_i = Σ_{l ≤ i} log f_l its prefix sum:
    D_ij  = Σ_{l=j+1..i} log f_l = F_i − F_j          (j ≤ i)
    out_i = Σ_j softmax_j(scale · q_i·k_j + D_ij) · v_j

impl: "reference" (O(s²) memory, the ground truth) or "chunked" ("auto"). The chunked op is
plain attention with one extra head dimension: q' = [q, 1], k' = [k, (F_r − F_j)/scale], so
scale·q'·k' = scale·q·k + F_r − F_j, which differs from the logit by F_i − F_r, one
constant per row that the softmax ignores. F_r is F at the first row of each block of
``ROWS`` query rows: it keeps the added column no larger than the forget mass between a
block's rows and its keys, where the plain −F_j would grow with the sequence and lose fp32
digits. So the work is PyTorch's fused CPU flash kernel's (``ops.plain_attention``; on
other devices, or with ``flash=False``, the same math in row-chunked matrix products), and
backward recomputes it from q, k, v, F, the output and one log-sum-exp per row: nothing
[s, s] is kept. The column's gradient is the key's −dF_j, summed per block into dF_r.
No library has this: the authors' kernel is single-device Triton, and flash-linear-
attention's too; PyTorch's SDPA has no per-key bias without materializing [s, s].

Keys whose weight is certainly below the dtype's smallest subnormal for every row of a
part are left out (``far_keys``): their terms are exactly 0 in that dtype anyway, and
computing them is slow on CPUs, where subnormal arithmetic takes microcode assists (with
strong forgetting, a 4k-token fwd+bwd ran 3-5x slower). F is non-increasing (log f ≤ 0),
so they are a prefix of the keys. Keys nearer than that whose weights still fall in the
subnormal range are computed by the flash kernel, at the CPU's subnormal speed unless the
process flushes subnormals, as every training and evaluation process here does
(``distributed.cpu_compat``; bench/results_peers_op_cpu.txt has both).

``part_forward``/``part_backward`` also serve a (query chunk, key chunk) pair of a sequence
split over context-parallel ranks (``ops.context_parallel.fox``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype
from cope_megatron.ops.plain_attention import (
    attention_backward,
    attention_with_lse,
    merge_softmax,
)

ROWS = 1024
"""Query rows per block; each block shifts the bias by F at its first row."""

Impl = Literal["auto", "reference", "chunked"]


def fox_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor,
                  *, softmax_scale: float) -> torch.Tensor:
    """The paper's equations, materializing [b, h, s, s]: q [b, h, s, d]; k, v [b, g, s, d];
    log_f [b, h, s]."""
    h, s = q.shape[1], q.shape[2]
    k, v = expand_kv(k, h), expand_kv(v, h)
    prefix = log_f.cumsum(-1)
    logits = softmax_scale * q @ k.transpose(-1, -2) + prefix[..., :, None] - prefix[..., None, :]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1) @ v


def _augment(q, k, v, shift, f_keys, scale: float):
    """q' = [q, 1], k' = [k, (shift − F_j)/scale], v' = [v, 0] (the flash kernel wants one
    head size for all three), in the bias's dtype: bf16 inputs are converted part by part."""
    q, k, v = (t.to(f_keys.dtype) for t in (q, k, v))
    q_aug = torch.cat([q, q.new_ones(*q.shape[:-1], 1)], -1)
    k_aug = torch.cat([k, ((shift[..., None] - f_keys) / scale)[..., None]], -1)
    return q_aug, k_aug, F.pad(v, (0, 1))


def far_keys(q, k, shift, f_keys, own_key_norm, *, scale: float) -> int:
    """How many leading keys weigh below the smallest subnormal of the bias's dtype for every
    row and head: for row i ≥ the shift's row, key j and the row's own key k_i,
    logit_ij − lse_i ≤ logit_ij − logit_ii ≤ scale·|q_i|(|k_j| + |k_i|) + shift − F_j
    (F_i ≤ shift). ``own_key_norm`` [b, h]: the largest |k_i| of the rows' own keys."""
    finfo = torch.finfo(f_keys.dtype)
    # log(tiny·eps), the smallest subnormal, with margin; as a sum of logs, since the
    # product itself is subnormal and a process that flushes subnormals makes it 0.
    floor = math.log(finfo.tiny) + math.log(finfo.eps) - 8
    q_norm = q.to(f_keys.dtype).norm(dim=-1).amax(-1)[..., None]
    bound = (scale * q_norm * (k.to(f_keys.dtype).norm(dim=-1) + own_key_norm[..., None])
             + shift[..., None] - f_keys)
    return int((bound < floor).int().cumprod(-1).sum(-1).min())


def key_norms(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|k_j| [b, h, n] in ``dtype``."""
    return k.to(dtype).norm(dim=-1)


def part_forward(q, k, v, shift, f_keys, *, scale: float, causal: bool, flash: bool):
    """(out, lse) of rows q [b, h, m, d] over keys k, v [b, h, n, d] with the bias
    shift − F_j (shift [b, h], f_keys [b, h, n]); ``causal``: row r sees keys 0…r."""
    out, lse = attention_with_lse(*_augment(q, k, v, shift, f_keys, scale), scale, causal,
                                  flash=flash)
    return out[..., :-1], lse


def part_backward(d_out, q, k, v, shift, f_keys, out, lse, *, scale: float, causal: bool,
                  flash: bool):
    """(dq, dk, dv, dF of the keys, dshift) of one ``part_forward``, given the rows' merged
    output and lse (from every part of the row, all with the same shift)."""
    dq, dk, dv = attention_backward(F.pad(d_out, (0, 1)), *_augment(q, k, v, shift, f_keys,
                                                                     scale),
                                    F.pad(out, (0, 1)), lse, scale, causal, flash=flash)
    d_col = dk[..., -1] / scale  # the column is (shift − F_j)/scale
    return dq[..., :-1], dk[..., :-1], dv[..., :-1], -d_col, d_col.sum(-1)


def _parts(q, k, prefix, scale: float, rows: int):
    """(row block, key range, causal) of the flash calls: per block of rows, the keys
    before it (a rectangle, less its ``far_keys``) and its own (a top-left-aligned causal
    triangle). q [b, h, s, d], k expanded."""
    s = q.shape[2]
    for i0 in range(0, s, rows):
        i1 = min(s, i0 + rows)
        if i0:
            own = key_norms(k[:, :, i0:i1], prefix.dtype).amax(-1)
            j0 = far_keys(q[:, :, i0:i1], k[:, :, :i0], prefix[:, :, i0], prefix[:, :, :i0],
                          own, scale=scale)
            if j0 < i0:
                yield i0, i1, j0, i0, False
        yield i0, i1, i0, i1, True


class _FoXChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix, scale, flash, rows):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v, prefix = q.detach(), k.detach(), v.detach(), prefix.detach().to(work)
        ke, ve = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        out = torch.zeros(q.shape, dtype=work, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)
        for i0, i1, j0, j1, causal in _parts(q, ke, prefix, scale, rows):
            part = part_forward(q[:, :, i0:i1], ke[:, :, j0:j1], ve[:, :, j0:j1],
                                prefix[:, :, i0], prefix[:, :, j0:j1], scale=scale,
                                causal=causal, flash=flash)
            merge_softmax(out[:, :, i0:i1], lse[:, :, i0:i1], *part)
        ctx.save_for_backward(q, k, v, prefix, out, lse)
        ctx.cfg = (scale, flash, rows, dtype)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix, out, lse = ctx.saved_tensors
        scale, flash, rows, dtype = ctx.cfg
        h, kv_heads = q.shape[1], k.shape[1]
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        d_out = d_out.to(prefix.dtype).contiguous()
        dq, dk, dv = (torch.zeros(t.shape, dtype=prefix.dtype, device=t.device)
                      for t in (q, ke, ve))
        d_prefix = torch.zeros_like(prefix)
        for i0, i1, j0, j1, causal in _parts(q, ke, prefix, scale, rows):
            dq_p, dk_p, dv_p, df_keys, d_shift = part_backward(
                d_out[:, :, i0:i1], q[:, :, i0:i1], ke[:, :, j0:j1], ve[:, :, j0:j1],
                prefix[:, :, i0], prefix[:, :, j0:j1], out[:, :, i0:i1], lse[:, :, i0:i1],
                scale=scale, causal=causal, flash=flash)
            dq[:, :, i0:i1] += dq_p
            dk[:, :, j0:j1] += dk_p
            dv[:, :, j0:j1] += dv_p
            d_prefix[:, :, j0:j1] += df_keys
            d_prefix[:, :, i0] += d_shift
        dk, dv = reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), d_prefix, None, None, None


def default_flash(device: torch.device, flash: bool | None) -> bool:
    """The CPU's fused flash kernel on CPU; elsewhere (or ``flash=False``: what CUDA runs,
    forced on a CPU for tests) the row-chunked matrix products."""
    if flash and device.type != "cpu":
        raise ValueError(f"FoX flash=True runs on CPU only, not {device.type}")
    return device.type == "cpu" if flash is None else flash


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor
                 ) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[2:] != q.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want "
                         "[b, h, s, d] and [b, g, s, d] with g dividing h")
    if log_f.shape != q.shape[:3]:
        raise ValueError(f"log_f must be [b, h, s] = {tuple(q.shape[:3])}, got "
                         f"{tuple(log_f.shape)}")


def fox_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor, *,
                  softmax_scale: float | None = None, impl: Impl = "auto",
                  flash: bool | None = None, rows: int = ROWS) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d]; log_f [b, h, s] (log forget gates, ≤ 0)
    -> [b, h, s, d]. ``flash``: the chunked op's attention code (``default_flash``)."""
    check_inputs(q, k, v, log_f)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if impl == "reference":
        return fox_reference(q, k, v, log_f.to(q.dtype), softmax_scale=scale)
    if impl not in ("auto", "chunked"):
        raise ValueError(f"unknown FoX impl {impl!r}; use auto, reference or chunked")
    prefix = log_f.to(work_dtype(q.dtype)).cumsum(-1)
    return _FoXChunked.apply(q, k, v, prefix, scale, default_flash(q.device, flash), rows)
