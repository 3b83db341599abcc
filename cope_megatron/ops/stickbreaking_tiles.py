"""Stick-breaking attention's tile math and its walk over one (query chunk, key chunk) pair:
query rows in blocks against key tiles from the diagonal back, the log-survival carried
from tile to tile, each block stopping once every row's stick is spent (its weights are 0
in the working dtype); the backward recomputes the tiles the forward visited. The
single-rank op (``ops.stickbreaking``) is the whole sequence as one diagonal pair; the
context-parallel op (``ops.context_parallel.stickbreaking``) runs its pairs with carries
from nearer chunks. The tile math (``blocks``, ``block_code``) runs in torch, eagerly or
through torch.compile (CUDA's choice from ``COMPILE_MIN_SEQ`` keys), or as the C++ kernel
of ``ops.stickbreaking_native`` (CPU's): no library has it (the authors' kernel is
single-device Triton).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cope_megatron.ops import stickbreaking_native
from cope_megatron.ops.cope.blocks import compile_block
from cope_megatron.ops.cope.paths import COMPILE_MIN_SEQ, Band, can_compile


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


TILE = 256
"""Keys in a pair's first tile, nearest first (``key_tiles``: twice as many in the next)."""
TILE_ROWS = 256


def spent(dtype: torch.dtype) -> float:
    """A log-survival past which every weight is 0 (``_weights`` zeroes those below the
    dtype's smallest normal number), with margin."""
    return 1 - math.log(torch.finfo(dtype).tiny)


BLOCK_ELEMENTS = 2**19
"""Logits per block of query rows over all heads and batch rows (2 MiB in fp32)..."""
HEAD_ELEMENTS = 2**15
"""...or this many per batch row and head, whichever is more: with 8 batch rows × 16 heads
(a training step's shape), blocks of 16 rows ran a pair 2× slower than blocks of 64 (1k
tokens, CPU). Either way a block's working memory does not grow with the sequence. These
and ``key_tiles``' sizes ran as fast as twice the budgets and tiles twice as long, at
1 × 8 heads × 4k and 8 × 16 heads × 1k tokens, with either sticks."""
MIN_ROWS = 16


def row_blocks(batch_heads: int, n_rows: int, keys: int):
    """Blocks of query rows whose logits against ``keys`` keys are about
    max(``BLOCK_ELEMENTS``, ``HEAD_ELEMENTS`` per batch row and head), ``MIN_ROWS`` to
    ``TILE_ROWS`` rows (a block stops going back through the keys only once all its rows
    are spent)."""
    step = min(TILE_ROWS, max(MIN_ROWS, BLOCK_ELEMENTS // max(1, batch_heads * keys),
                              HEAD_ELEMENTS // max(1, keys)))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


class _Reversed:
    """A chunk's keys nearest-first, and each row block's window of them: causal rows
    r0…r1−1 see keys 0…r1−2 (j < i), of which the nearest r1 − 1 − r0 may be after a row;
    otherwise every row sees every key."""

    def __init__(self, keys: int, causal: bool, device: torch.device) -> None:
        self.keys, self.causal, self.device = keys, causal, device

    def take(self, t: torch.Tensor, window: slice, dtype: torch.dtype) -> torch.Tensor:
        """t's keys [b, h, keys, d] in ``window`` of the reversed order, nearest first: a
        copy of the window only, never of the whole chunk."""
        return t[:, :, self.keys - window.stop:self.keys - window.start].flip(2).to(dtype)

    def add(self, t: torch.Tensor, window: slice, grad: torch.Tensor) -> None:
        """Adds ``grad`` (nearest first, over ``window``) into t's keys."""
        t[:, :, self.keys - window.stop:self.keys - window.start] += grad.flip(2)

    def window(self, r0: int, r1: int) -> tuple[slice, torch.Tensor | None]:
        """(slice of the reversed keys, drop mask [B, M]); an empty slice: no keys."""
        if not self.causal:
            return slice(0, self.keys), None
        end = r1 - 1  # keys 0…end−1
        near = torch.arange(end - 1, r0 - 1, -1, device=self.device)  # keys end−1 … r0
        row_ids = torch.arange(r0, r1, device=self.device)
        return slice(self.keys - end, self.keys), near[None, :] >= row_ids[:, None]


def key_tiles(keys: slice):
    """A window's keys (nearest first) in tiles: ``TILE`` keys, then 2·``TILE`` at a time,
    so that a row block that stops early stops near the diagonal, one whose sticks reach
    far back takes fewer calls, and no buffer grows with the chunk."""
    t0, size = keys.start, TILE
    while t0 < keys.stop:
        t1 = min(keys.stop, t0 + size)
        yield t0, t1
        t0, size = t1, 2 * TILE


def pair_blocks(q: torch.Tensor, k: torch.Tensor):
    """Row blocks of a chunk pair, sized for its widest key tile."""
    return row_blocks(q.shape[0] * q.shape[1], q.shape[2], min(k.shape[2], 2 * TILE))


def _drop_part(drop: torch.Tensor | None, keys: slice, t0: int, t1: int):
    """The part of a window's drop mask (over its first M keys) in tile t0…t1−1, or None."""
    if drop is None or t0 - keys.start >= drop.shape[-1]:
        return None
    return drop[:, t0 - keys.start:t1 - keys.start]


def chunk_forward(q, k, v, carry, *, scale: float, causal: bool, used: list[int],
                  blocks: Band | None = None):
    """(Σ_j A_ij v_j [b, h, sq, d], Σ_j A_ij [b, h, sq], the carry past the chunk) of query
    rows over one key chunk: q [b, h, sq, d]; k, v [b, h, sk, d] (expanded); carry
    [b, h, sq], Σ sp over the rows' keys nearer than the chunk. ``causal``: the rows' own
    chunk (key j is row i's if j < i); otherwise every key is before every row. A row block
    takes the keys in ``key_tiles`` and stops once every row's carry is past ``spent``
    (every farther weight is 0), so a block whose rows arrive past it costs nothing; the
    carry returned is exact below the limit and past it otherwise. ``used``: a list to
    which each row block's keys visited are appended, for ``chunk_loss_sums`` and
    ``chunk_backward``."""
    fwd, _ = block_functions(block_code(q.device, k.shape[2], blocks))
    work, limit = carry.dtype, spent(carry.dtype)
    order = _Reversed(k.shape[2], causal, q.device)
    acc = torch.zeros(q.shape, dtype=work, device=q.device)
    mass = torch.zeros(q.shape[:3], dtype=work, device=q.device)
    past = carry.clone()
    for r0, r1 in pair_blocks(q, k):
        keys, drop = order.window(r0, r1)
        run, visited = carry[:, :, r0:r1], 0
        if not bool((run > limit).all()):
            q_blk = q[:, :, r0:r1].to(work)
            for t0, t1 in key_tiles(keys):
                tile = slice(t0, t1)
                a, m, run = fwd(q_blk, order.take(k, tile, work), order.take(v, tile, work),
                                _drop_part(drop, keys, t0, t1), run, scale)
                acc[:, :, r0:r1] += a
                mass[:, :, r0:r1] += m
                visited = t1 - keys.start
                if bool((run > limit).all()):
                    break
            past[:, :, r0:r1] = run
        used.append(visited)
    return acc, mass, past


def _visited_tiles(q, k, causal: bool, used: list[int]):
    """Per row block of a pair: (r0, r1, its tiles as (reversed-key slice, drop part)) over
    the keys ``chunk_forward`` visited (``used``). Keys past them have no weight and no
    gradient."""
    order = _Reversed(k.shape[2], causal, q.device)
    for (r0, r1), visited in zip(pair_blocks(q, k), used, strict=True):
        keys, drop = order.window(r0, r1)
        yield r0, r1, [(slice(t0, t1), _drop_part(drop, keys, t0, t1))
                       for t0, t1 in key_tiles(slice(keys.start, keys.start + visited))]


def chunk_loss_sums(q, k, v, carry, d_out, self_dot, *, scale: float, causal: bool,
                    used: list[int], blocks: Band | None = None) -> torch.Tensor:
    """Each row's Σ_j dL_ij [b, h, sq] over the keys one ``chunk_forward`` visited, by that
    forward again: Σ_j dL_ij = dO_i·Σ_j A_ij v_j − (Σ_j A_ij) dO_i·v_i. ``self_dot``:
    dO_i·v_i [b, h, sq]."""
    fwd, _ = block_functions(block_code(q.device, k.shape[2], blocks))
    work = carry.dtype
    order = _Reversed(k.shape[2], causal, q.device)
    sums = torch.zeros_like(carry)
    for r0, r1, tiles in _visited_tiles(q, k, causal, used):
        q_blk, do_blk, dot_blk = (t[:, :, r0:r1].to(work) for t in (q, d_out, self_dot))
        run = carry[:, :, r0:r1]
        for tile, part in tiles:
            a, m, run = fwd(q_blk, order.take(k, tile, work), order.take(v, tile, work),
                            part, run, scale)
            sums[:, :, r0:r1] += (do_blk * a).sum(-1) - m * dot_blk
    return sums


def chunk_backward(q, k, v, carry, d_out, self_dot, farther, grads, *, scale: float,
                   causal: bool, used: list[int], blocks: Band | None = None) -> None:
    """Adds one ``chunk_forward``'s (dq, dk, dv) into ``grads`` (dk, dv over the expanded
    heads), recomputing the tiles it visited (``used``). ``farther`` [b, h, sq]: each
    row's Σ dL over this chunk's keys and every farther chunk's (``chunk_loss_sums``), from
    which each tile's Σ_{j≤t} dL follows as the tiles go back: dz_it = dL_it − β_it ·
    Σ_{j≤t} dL_ij is then exact, whatever chunks lie beyond."""
    dq, dk, dv = grads
    _, bwd = block_functions(block_code(q.device, k.shape[2], blocks))
    work = carry.dtype
    order = _Reversed(k.shape[2], causal, q.device)
    for r0, r1, tiles in _visited_tiles(q, k, causal, used):
        q_blk, do_blk, dot_blk = (t[:, :, r0:r1].to(work) for t in (q, d_out, self_dot))
        run, far = carry[:, :, r0:r1], farther[:, :, r0:r1]
        for tile, part in tiles:
            dq_b, dk_t, dv_t, tile_sum, run = bwd(
                q_blk, order.take(k, tile, work), order.take(v, tile, work), part, run,
                do_blk, dot_blk, scale, far)
            far = far - tile_sum
            dq[:, :, r0:r1] += dq_b
            order.add(dk, tile, dk_t)
            order.add(dv, tile, dv_t)
