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

impl: "reference" (O(s²) memory, the ground truth) or "chunked" ("auto"): on one rank, query
rows in blocks against key tiles from the diagonal back, the log-survival carried from tile
to tile, until every row's weights are 0 in the working dtype (``_StickBreakingChunked``:
with β ≈ ½ that is a couple of hundred keys, so the work is nearly linear in s); backward
recomputes the same tiles from q, k, v, the output and each row's remainder, so nothing
[s, s] is kept. Weights below the dtype's smallest normal number are set to exactly 0:
subnormal arithmetic is slow on CPUs and such terms cannot change a sum in the dtype.
The same tile functions serve the (query chunk, key chunk) pairs of a sequence split over
context-parallel ranks (``ops.context_parallel.stickbreaking``), with the row's Σ sp over
nearer keys in other chunks as their carry. The block math (``blocks``,
``block_code``) runs in torch, eagerly or through torch.compile (CUDA's choice from
``COMPILE_MIN_SEQ`` keys), or as the C++ kernel of ``ops.stickbreaking_native`` (CPU's):
no library has it (the authors' kernel is single-device Triton).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from cope_megatron.ops import stickbreaking_native
from cope_megatron.ops.cope.blocks import compile_block
from cope_megatron.ops.cope.paths import COMPILE_MIN_SEQ, Band, can_compile
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


def _weights(q_blk, k_rev, drop, carry_blk, scale: float):
    """(z, A) of a block: rows q_blk [..., B, d] against a window of keys in reverse order,
    nearest first (k_rev [..., L, d]); ``drop`` [B, M] marks which of the first M keys are
    not the row's (None: all are); carry_blk [..., B]: Σ sp over the row's keys nearer
    than the window. In this order the running sum from the diagonal back is a forward
    cumulative sum, and log A = z − sp − Σ_{nearer} sp = z − (inclusive sum) − carry.
    Dropped keys get z = −∞, hence sp = 0, A = 0 and β = 0."""
    z = scale * (q_blk @ k_rev.transpose(-1, -2))
    if drop is not None:
        z[..., :drop.shape[-1]].masked_fill_(drop, float("-inf"))
    survived = F.softplus(z).cumsum(-1) + carry_blk[..., None]
    log_w = z - survived
    # Weights below the dtype's smallest normal number become exactly 0: subnormal
    # arithmetic costs CPUs microcode assists (a 4k-token fwd+bwd ran several times
    # slower), and no sum of such terms with anything else can be seen in the dtype.
    log_w.masked_fill_(log_w < math.log(torch.finfo(z.dtype).tiny), float("-inf"))
    return z, torch.exp(log_w), survived[..., -1]


def forward_block(q_blk, k_rev, v_rev, drop, carry_blk, scale: float):
    """(Σ_j A_ij v_j, Σ_j A_ij, the carry past the window) of a block (``_weights``)."""
    _, weights, carry = _weights(q_blk, k_rev, drop, carry_blk, scale)
    return weights @ v_rev, weights.sum(-1), carry


def backward_block(q_blk, k_rev, v_rev, drop, carry_blk, do_blk, self_dot_blk, scale: float,
                   farther_blk):
    """(dq, dk_rev, dv_rev, Σ_j dL_ij, the carry past the window) of a block;
    ``self_dot_blk`` = dO_i·v_i. dz_it = dL_it (1 − β_it) − β_it Σ_{j<t} dL_ij
    = dL_it − β_it Σ_{j≤t} dL_ij, the sum over the keys as far as or farther than t:
    ``farther_blk`` (Σ dL over the window's keys and all farther ones) minus the window's
    nearer ones. No cancellation to fear: |Σ dL| ≤ max |dA|, as Σ A ≤ 1."""
    z, weights, carry = _weights(q_blk, k_rev, drop, carry_blk, scale)
    d_l = weights * (do_blk @ v_rev.transpose(-1, -2) - self_dot_blk[..., None])
    nearer = d_l.cumsum(-1)
    total = nearer[..., -1:]
    farther = farther_blk[..., None]
    dz = d_l - torch.sigmoid(z) * (farther - nearer + d_l)
    return (scale * (dz @ k_rev), scale * (dz.transpose(-1, -2) @ q_blk),
            weights.transpose(-1, -2) @ do_blk, total[..., 0], carry)


def block_functions(blocks: Band):
    """The (forward, backward) tile functions of ``blocks``' code (``block_code``)."""
    if blocks == "compiled":
        return compile_block(forward_block), compile_block(backward_block)
    if blocks == "native":
        return stickbreaking_native.forward_block, stickbreaking_native.backward_block
    return forward_block, backward_block


def block_code(device: torch.device, keys: int, blocks: Band | None) -> Band:
    """The code of the tile math: ``blocks`` where given (e.g. CUDA's choice on a CPU, for
    tests), else the device's. CPU: the C++ kernel ("native"), or "eager" where it did not
    build (torch.compile's C++ ran no faster than aten's vectorized ops: the scans split
    its fusions). CUDA: torch.compile (Triton) from ``COMPILE_MIN_SEQ`` keys where Triton is
    there, else eager (compiling costs seconds once per process)."""
    if blocks == "native" and (device.type != "cpu" or stickbreaking_native.library() is None):
        raise RuntimeError(f"stick-breaking blocks='native' runs on CPU where its C++ kernel "
                           f"builds, not here ({device.type})")
    if blocks is not None:
        return blocks
    if device.type == "cpu":
        return "native" if stickbreaking_native.library() is not None else "eager"
    return "compiled" if keys >= COMPILE_MIN_SEQ and can_compile(device.type) else "eager"


def with_remainder(acc: torch.Tensor, mass: torch.Tensor, v_self: torch.Tensor
                   ) -> torch.Tensor:
    """out_i = Σ_j A_ij v_j + (1 − Σ_j A_ij) v_i."""
    return acc + (1 - mass)[..., None] * v_self


TILE = 256
"""Keys per tile of the single-rank op, nearest first (and a CP pair's first tile). With
sticks that reach far back (every tile visited), 256 × 256 tiles ran at 1.9× SDPA's time at
4k against 2.7× for 128 × 128; with short ones (β ≈ ½, a couple of tiles per row block) at
0.5× against 0.35× (``bench/peers_op.py``, the C++ kernel)."""
TILE_ROWS = 256


def spent(dtype: torch.dtype) -> float:
    """A log-survival past which every weight is 0 (``_weights`` zeroes those below the
    dtype's smallest normal number), with margin."""
    return 1 - math.log(torch.finfo(dtype).tiny)


def _tiles(q, k, v, r0: int, r1: int, work: torch.dtype):
    """(key range, k and v nearest first, drop mask) of the tiles of rows r0…r1−1: their
    keys 0…r1−2, from the diagonal back, ``TILE`` at a time."""
    end = r1 - 1
    rows = torch.arange(r0, r1, device=q.device)
    for j1 in range(end, 0, -TILE):
        j0 = max(0, j1 - TILE)
        keys = torch.arange(j1 - 1, j0 - 1, -1, device=q.device)
        near = keys >= r0  # only keys at or after the first row can be after a row
        drop = keys[near][None, :] >= rows[:, None] if bool(near.any()) else None
        yield (j0, j1, k[:, :, j0:j1].flip(2).to(work), v[:, :, j0:j1].flip(2).to(work),
               drop)


class _StickBreakingChunked(torch.autograd.Function):
    """One rank: rows in blocks of ``TILE_ROWS``, keys in tiles from the diagonal back,
    the log-survival carried from tile to tile. Once every row of a block has a log-
    survival past ``spent``, all farther weights are exactly 0 in the working dtype, and
    so are their gradients (dz = dL − β Σ_{j≤t} dL, every term 0): the block stops, and
    the backward recomputes the same tiles. Σ_{j≤t} dL comes from each row's total over
    all its keys, Σ_j dL_ij = dO_i·(out_i − v_i), less the nearer tiles'."""

    @staticmethod
    def forward(ctx, q, k, v, scale, blocks):
        dtype, work = q.dtype, work_dtype(q.dtype)
        q, k, v = q.detach(), k.detach(), v.detach()  # bf16 stays bf16: tiles convert
        ke, ve = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        blocks = block_code(q.device, q.shape[2], blocks)
        fwd, _ = block_functions(blocks)
        acc = torch.zeros(q.shape, dtype=work, device=q.device)
        mass = torch.zeros(q.shape[:3], dtype=work, device=q.device)
        limit, used = spent(work), []
        for r0 in range(0, q.shape[2], TILE_ROWS):
            r1 = min(q.shape[2], r0 + TILE_ROWS)
            q_blk, carry, n = q[:, :, r0:r1].to(work), mass.new_zeros(*q.shape[:2], r1 - r0), 0
            for _, _, k_t, v_t, drop in _tiles(q, ke, ve, r0, r1, work):
                a, m, carry = fwd(q_blk, k_t, v_t, drop, carry, scale)
                acc[:, :, r0:r1] += a
                mass[:, :, r0:r1] += m
                n += 1
                if bool((carry > limit).all()):
                    break
            used.append(n)
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
        _, bwd = block_functions(blocks)
        d_out = d_out.to(work).contiguous()
        self_dot = (d_out * ve).sum(-1)
        row_total = (d_out * out).sum(-1) - self_dot  # Σ_j dL_ij = dO_i·(out_i − v_i)
        dq, dk = (torch.zeros(t.shape, dtype=work, device=t.device) for t in (q, ke))
        dv = (1 - mass)[..., None] * d_out  # the remainder's own value
        for r0, n in zip(range(0, q.shape[2], TILE_ROWS), used):
            r1 = min(q.shape[2], r0 + TILE_ROWS)
            q_blk, do_blk, dot_blk = q[:, :, r0:r1].to(work), d_out[:, :, r0:r1], \
                self_dot[:, :, r0:r1]
            carry, farther = torch.zeros_like(dot_blk), row_total[:, :, r0:r1]
            for _, (j0, j1, k_t, v_t, drop) in zip(range(n), _tiles(q, ke, ve, r0, r1, work)):
                dq_b, dk_t, dv_t, tile_sum, carry = bwd(q_blk, k_t, v_t, drop, carry, do_blk,
                                                        dot_blk, scale, farther)
                farther = farther - tile_sum
                dq[:, :, r0:r1] += dq_b
                dk[:, :, j0:j1] += dk_t.flip(2)
                dv[:, :, j0:j1] += dv_t.flip(2)
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
    tile code (``block_code``)."""
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if impl == "reference":
        return stickbreaking_reference(q, k, v, softmax_scale=scale)
    if impl not in ("auto", "chunked"):
        raise ValueError(f"unknown stick-breaking impl {impl!r}; use auto, reference or "
                         "chunked")
    return _StickBreakingChunked.apply(q, k, v, scale, blocks)
