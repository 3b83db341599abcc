"""Stick-breaking attention (Tan et al., ICLR 2025, arXiv 2410.17980), exactly.

    stickbreaking_attention(q, k, v, softmax_scale=None, impl="auto", blocks=None)
        -> [batch, heads, seq, head_dim]

Per head, query i and earlier key j < i (no softmax):
    z_ij  = scale · q_i·k_j,   β_ij = σ(z_ij)
    A_ij  = β_ij · Π_{j<t<i} (1 − β_it)          (the nearest keys break the stick first)
    out_i = Σ_{j<i} A_ij v_j + (1 − Σ_{j<i} A_ij) · v_i
The last term gives what is left of the stick to the token itself, as the authors' code
does (their reference returns the remainder and their tests and models add
``rem · v``); the diagonal is not one of the keys. In log space, with sp = softplus(z) =
−log(1 − β): log A_ij = z_ij − sp_ij − Σ_{j<t<i} sp_it, a running sum per row from the
diagonal back. Backward, with dA_ij = dO_i·(v_j − v_i) and dL = A ⊙ dA:
    dz_it = dL_it · (1 − β_it) − β_it · Σ_{j<t} dL_ij,
a forward cumulative sum of dL along the row (the adjoint of the running sum).

impl: "reference" (O(s²) memory, the ground truth) or "chunked" ("auto"): on one rank, the
whole sequence as one diagonal pair of ``ops.stickbreaking_tiles``: query rows in blocks
against key tiles from the diagonal back, the log-survival carried from tile to tile, until
every row's weights are 0 in the working dtype (with β ≈ ½ that is a couple of hundred
keys, so the work is nearly linear in s); backward recomputes the same tiles from q, k, v,
the output and each row's remainder, so nothing [s, s] is kept. Weights below the dtype's
smallest normal number are set to exactly 0: subnormal arithmetic is slow on CPUs and such
terms cannot change a sum in the dtype. The same pair code serves a sequence split over
context-parallel ranks (``ops.context_parallel.stickbreaking``), with the row's Σ sp over
nearer keys in other chunks as the carry.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from cope_megatron.ops import stickbreaking_tiles as tiles
from cope_megatron.ops.cope.paths import Band
from cope_megatron.ops.heads import expand_kv, reduce_kv_heads, work_dtype

Impl = Literal["auto", "reference", "chunked"]


def stickbreaking_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            softmax_scale: float) -> torch.Tensor:
    """The paper's equations, materializing [b, h, s, s]: q [b, h, s, d]; k, v [b, g, s, d]."""
    h, s = q.shape[1], q.shape[2]
    k, v = expand_kv(k, h), expand_kv(v, h)
    z = softmax_scale * q @ k.transpose(-1, -2)
    earlier = torch.ones(s, s, dtype=torch.bool, device=q.device).tril(-1)  # j < i
    log_survive = F.logsigmoid(-z).masked_fill(~earlier, 0.0)  # log(1 − β_it)
    # Σ_{j<t<i} log(1 − β_it): exclusive reverse cumulative sum along the keys.
    after = log_survive.flip(-1).cumsum(-1).flip(-1) - log_survive
    weights = torch.exp(F.logsigmoid(z) + after).masked_fill(~earlier, 0.0)
    remainder = 1 - weights.sum(-1, keepdim=True)
    return weights @ v + remainder * v


def with_remainder(acc: torch.Tensor, mass: torch.Tensor, v_self: torch.Tensor
                   ) -> torch.Tensor:
    """out_i = Σ_j A_ij v_j + (1 − Σ_j A_ij) v_i."""
    return acc + (1 - mass)[..., None] * v_self


def loss_sums(d_out: torch.Tensor, out: torch.Tensor, v_self: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dO_i·v_i, each row's Σ_j dL_ij over all its keys) [b, h, s], from the output:
    with dL_ij = A_ij dO_i·(v_j − v_i), Σ_j dL_ij = dO_i·(out_i − v_i) (``with_remainder``)."""
    self_dot = (d_out * v_self).sum(-1)
    return self_dot, (d_out * out).sum(-1) - self_dot


class _StickBreakingChunked(torch.autograd.Function):
    """One rank: the whole sequence as one diagonal pair of ``ops.stickbreaking_tiles``
    (row blocks against key tiles from the diagonal back, each block stopping once every
    row's stick is spent; the backward recomputes the same tiles). Σ_{j≤t} dL comes from
    each row's total over all its keys, Σ_j dL_ij = dO_i·(out_i − v_i), less the nearer
    tiles'."""

    @staticmethod
    def forward(ctx, q, k, v, scale, blocks):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.detach(), k.detach(), v.detach()  # bf16 stays bf16: tiles convert
        ve = expand_kv(v, q.shape[1])
        carry = torch.zeros(q.shape[:3], dtype=work, device=q.device)
        used: list[int] = []
        acc, mass, _ = tiles.chunk_forward(q, expand_kv(k, q.shape[1]), ve, carry, scale=scale,
                                           causal=True, blocks=blocks, used=used)
        out = with_remainder(acc, mass, ve)
        ctx.save_for_backward(q, k, v, mass, out)
        ctx.cfg = (scale, blocks, dtype, used)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, mass, out = ctx.saved_tensors
        scale, blocks, dtype, used = ctx.cfg
        h, kv_heads, work = q.shape[1], k.shape[1], mass.dtype
        ke, ve = expand_kv(k, h), expand_kv(v, h)
        d_out = d_out.to(work).contiguous()
        self_dot, row_total = loss_sums(d_out, out, ve)
        dq, dk = (torch.zeros(t.shape, dtype=work, device=t.device) for t in (q, ke))
        dv = (1 - mass)[..., None] * d_out  # the remainder's own value
        tiles.chunk_backward(q, ke, ve, torch.zeros_like(mass), d_out, self_dot, row_total,
                             (dq, dk, dv), scale=scale, causal=True, used=used,
                             blocks=blocks)
        dk, dv = reduce_kv_heads(dk, kv_heads), reduce_kv_heads(dv, kv_heads)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[2:] != q.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want "
                         "[b, h, s, d] and [b, g, s, d] with g dividing h")


def stickbreaking_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            softmax_scale: float | None = None, impl: Impl = "auto",
                            blocks: Band | None = None) -> torch.Tensor:
    """q [b, h, s, d]; k, v [b, g, s, d] -> [b, h, s, d]. ``blocks``: the chunked op's
    tile code (``stickbreaking_tiles.block_code``)."""
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if impl == "reference":
        return stickbreaking_reference(q, k, v, softmax_scale=scale)
    if impl not in ("auto", "chunked"):
        raise ValueError(f"unknown stick-breaking impl {impl!r}; use auto, reference or "
                         "chunked")
    return _StickBreakingChunked.apply(q, k, v, scale, blocks)
