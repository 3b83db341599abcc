"""FoX forgetting attention with the sequence split over context-parallel ranks, exactly.

The bias D_ij = F_i − F_j needs F, the prefix sum of log forget gates over global
positions, so a rank's chunks need the gate total of every chunk before them: one number
per (batch, head, chunk). ``forget_prefix`` gets them with one all-reduce of a
[2·CP, b, h] table (each rank fills its two chunks), whose exclusive cumulative sum is each
chunk's offset. Every rank's loss depends on the sum, so its backward all-reduces the
gradients too, and the offsets' gradient reaches every earlier chunk's gates through
autograd (``torch.distributed.nn``'s differentiable all-reduce does this but is deprecated,
and the functional collectives that replace it have no backward). A ring would carry the
same numbers in CP − 1 steps; the all-reduce is one.

The attention is then softmax attention with the bias, one ring of K, V and the keys' F
(``ops.context_parallel.ring``): each (query chunk, key chunk) pair is ``ops.fox``'s
part (plain attention with one added head dimension, the flash kernel on CPU), with every
pair of a query chunk shifted by F at the chunk's first row, so that their log-sum-exps
merge; a pair before its rows leaves out its ``far_keys``, whose weights underflow; backward
sends dK, dV and the keys' dF home behind them. Saved: local q, k, v, F,
out and lse; no [c, c] tensor. With document boundaries each pair runs on its parts inside
one document (``ring.document_parts``): D of two tokens of one document is the same
difference of prefix sums, whatever came before it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cope_megatron.ops.context_parallel.ring import (
    ContextParallel,
    Documents,
    expanded,
    fold_expanded,
    pair_parts,
    rows,
)
from cope_megatron.ops.fox import (
    check_inputs,
    default_flash,
    far_keys,
    key_norms,
    part_backward,
    part_forward,
)
from cope_megatron.ops.heads import expand_kv, work_dtype
from cope_megatron.ops.plain_attention import merge_softmax


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def forget_prefix(log_f: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """F_i = Σ_{l ≤ i} log f_l over global positions, for this rank's head and tail chunks:
    log_f [b, h, 2c] -> [b, h, 2c], differentiable."""
    c = log_f.shape[-1] // 2
    local = [rows(log_f, i, c) for i in (0, 1)]
    table = log_f.new_zeros(2 * cp.size, *log_f.shape[:2])
    table = table.index_put((torch.tensor(cp.chunks(cp.rank), device=log_f.device),),
                            torch.stack([t.sum(-1) for t in local]))
    totals = _SumOverRanks.apply(table, cp.group)
    before = totals.cumsum(0) - totals
    return torch.cat([before[g][..., None] + t.cumsum(-1)
                      for g, t in zip(cp.chunks(cp.rank), local)], -1)


def _pair_keys(q, k, prefix, f_keys, own_norms, pair, c: int, scale: float) -> slice:
    """The keys of a pair that can weigh anything in the dtype (``ops.fox.far_keys``)."""
    if pair.diagonal:
        return slice(0, c)
    return slice(far_keys(rows(q, pair.q, c), k, prefix[:, :, pair.q * c], f_keys,
                          own_norms[pair.q], scale=scale), c)


def _visible_parts(cp: ContextParallel, owner: int, kvf: list[torch.Tensor], q, prefix,
                   own: list[torch.Tensor], scale: float, docs: Documents | None):
    """What forward and backward visit of ``owner``'s chunks: each pair's in-document parts
    (``ring.pair_parts``) whose keys, less the pair's ``far_keys``, are not empty, as
    (pair, part, query index, key index into the key chunk, the chunk's (K, V, F))."""
    h, c = q.shape[1], q.shape[2] // 2
    ke, ve = (expand_kv(t, h) for t in kvf[:2])
    for pair in cp.pairs(owner):
        chunk = [rows(t, pair.k, c) for t in (ke, ve, kvf[2])]
        near = _pair_keys(q, chunk[0], prefix, chunk[2], own, pair, c, scale)
        for part, qi, _, li in pair_parts(pair, c, docs):
            first = max(near.start, part.keys.start)
            if first < part.keys.stop:
                yield pair, part, qi, (li[0], slice(None), slice(first, part.keys.stop)), chunk


def _own_key_norms(k: torch.Tensor, dtype: torch.dtype, c: int) -> list[torch.Tensor]:
    """The largest |k_i| of each local chunk's own keys [b, h], k expanded."""
    return [key_norms(rows(k, i, c), dtype).amax(-1) for i in (0, 1)]


class _FoXContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix, cp: ContextParallel, scale: float, flash: bool, docs):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v, prefix = q.detach(), k.detach(), v.detach(), prefix.detach().to(work)
        h, c = q.shape[1], q.shape[2] // 2
        out = torch.zeros(q.shape, dtype=work, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)

        own = _own_key_norms(expand_kv(k, h), work, c)

        def visit(owner: int, kvf: list[torch.Tensor]) -> None:
            for pair, part, qi, ki, (k_c, v_c, f_c) in _visible_parts(
                    cp, owner, kvf, q, prefix, own, scale, docs):
                merge_softmax(out[qi], lse[qi], *part_forward(
                    q[qi], k_c[ki], v_c[ki], prefix[ki[0], :, pair.q * c], f_c[ki],
                    scale=scale, causal=part.causal, flash=flash))

        cp.ring([k, v, prefix], visit)
        ctx.save_for_backward(q, k, v, prefix, out, lse)
        ctx.cfg = (cp, scale, flash, dtype, docs)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, prefix, out, lse = ctx.saved_tensors
        cp, scale, flash, dtype, docs = ctx.cfg
        h, c = q.shape[1], q.shape[2] // 2
        work = prefix.dtype
        d_out = d_out.to(work).contiguous()
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        d_shift = torch.zeros_like(prefix)

        own = _own_key_norms(expand_kv(k, h), work, c)

        def visit(owner: int, kvf: list[torch.Tensor], acc: list[torch.Tensor]) -> None:
            dke, dve, dfk = grads = expanded(acc, h)
            for pair, part, qi, ki, (k_c, v_c, f_c) in _visible_parts(
                    cp, owner, kvf, q, prefix, own, scale, docs):
                b, shift = ki[0], pair.q * c
                dq_p, dk_p, dv_p, df_p, ds_p = part_backward(
                    d_out[qi], q[qi], k_c[ki], v_c[ki], prefix[b, :, shift], f_c[ki],
                    out[qi], lse[qi], scale=scale, causal=part.causal, flash=flash)
                dq[qi].add_(dq_p)
                for g, part_grad in zip((dke, dve, dfk), (dk_p, dv_p, df_p)):
                    rows(g, pair.k, c)[ki].add_(part_grad)
                d_shift[b, :, shift] += ds_p
            fold_expanded(acc, grads)

        dk, dv, d_prefix = cp.ring_backward([k, v, prefix], visit, work)
        return (dq.to(dtype), dk.to(dtype), dv.to(dtype), d_prefix + d_shift,
                None, None, None, None)


def fox_attention_context_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   log_f: torch.Tensor, cp: ContextParallel, *,
                                   softmax_scale: float, flash: bool | None = None,
                                   starts: torch.Tensor | None = None) -> torch.Tensor:
    """Causal FoX over a sequence split across ``cp``'s ranks (head-tail layout).

    q [b, h, 2c, d]; k, v [b, g, 2c, d]; log_f [b, h, 2c]: this rank's two chunks,
    concatenated. ``starts``: each token's document start [b, S] (``model.documents``):
    attention stays within documents. Returns this rank's rows of the single-rank output."""
    check_inputs(q, k, v, log_f)
    prefix = forget_prefix(log_f.to(work_dtype(q.dtype)), cp)
    return _FoXContextParallel.apply(q, k, v, prefix, cp, softmax_scale,
                                     default_flash(q.device, flash), Documents.of(starts))
