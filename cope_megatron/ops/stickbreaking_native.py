"""Stick-breaking's tile math on CPU as a small C++ kernel (``ops/csrc/stickbreaking_tile.cpp``;
built and loaded by ``ops.native_build``).

Why by hand: as with CoPE's band (``ops.cope.native``), a tile's matmuls are not most of
its work: the passes between them are (softplus, a running sum along the keys, the
weights' exp, the threshold; in the backward also the stick gradient's sum and σ), each a
pass over a logit-sized buffer in torch, and the scans stop torch.compile from fusing them.
With the logits transposed ([keys, rows]: rows are SIMD lanes, each keeping its own running
sum), the C++ does them in one sweep down the keys, nearest first (the backward adds a
light second one). No library has it (the authors' kernel is Triton, for GPUs).

``forward_block`` and ``backward_block`` take and return what ``ops.stickbreaking_tiles``'
functions of the same names do, so the op can run either.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cope_megatron.ops import native_build


class _Tile(ctypes.Structure):
    """``struct Tile`` of the C++ source, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in ("problems", "keys", "rows")] + [
        (name, ctypes.c_double) for name in ("scale", "tiny")] + [
        (name, ctypes.c_void_p) for name in ("skip", "carry")]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None, with a warning, where it cannot be built (the tile math
    then runs in torch: ``ops.stickbreaking_tiles.block_code``)."""
    return native_build.load("stickbreaking_tile", {
        f"stickbreaking_{name}_{suffix}": arity for name, arity in (("forward", 4),
                                                                     ("backward", 8))
        for suffix in ("f32", "f64")})


def _call(name: str, a: torch.Tensor, drop, carry: torch.Tensor, scale: float,
          *tensors: torch.Tensor) -> None:
    """Runs ``stickbreaking_{name}`` over raw products a [..., L, B] (keys nearest first,
    rows last); ``drop`` [B, M]: each row's leading keys that are not its own (None: none)."""
    keys, rows = a.shape[-2:]
    skip = (torch.zeros(rows, dtype=torch.int32) if drop is None
            else drop.sum(-1, dtype=torch.int32))
    args = _Tile(problems=a.numel() // (keys * rows), keys=keys, rows=rows, scale=scale,
                 tiny=torch.finfo(a.dtype).tiny, skip=skip.data_ptr(),
                 carry=carry.data_ptr())
    # The kernel walks raw pointers: every tensor dense, of one dtype (checked even under -O).
    if not all(t.is_contiguous() and t.dtype == a.dtype for t in (carry, *tensors)):
        raise ValueError("stick-breaking kernel: every tensor must be contiguous and "
                         f"{a.dtype}")
    suffix = {torch.float32: "f32", torch.float64: "f64"}[a.dtype]
    getattr(library(), f"stickbreaking_{name}_{suffix}")(
        ctypes.byref(args), *(t.data_ptr() for t in tensors))


def forward_block(q_blk, k_rev, v_rev, drop, carry_blk, scale: float):
    """As ``ops.stickbreaking_tiles.forward_block``."""
    a = k_rev @ q_blk.transpose(-1, -2)  # [..., L, B]: the kernel's lanes are rows
    carry = carry_blk.contiguous()
    mass, carry_out = torch.empty_like(carry), torch.empty_like(carry)
    _call("forward", a, drop, carry, scale, a, mass, carry_out)
    return a.transpose(-1, -2) @ v_rev, mass, carry_out  # a now holds the weights


def backward_block(q_blk, k_rev, v_rev, drop, carry_blk, do_blk, self_dot_blk, scale: float,
                   farther_blk):
    """As ``ops.stickbreaking_tiles.backward_block``."""
    a = k_rev @ q_blk.transpose(-1, -2)
    d = v_rev @ do_blk.transpose(-1, -2)  # v·dO, transposed alike
    weights = torch.empty_like(a)
    carry = carry_blk.contiguous()
    total, carry_out = torch.empty_like(carry), torch.empty_like(carry)
    _call("backward", a, drop, carry, scale, a, d, weights, self_dot_blk.contiguous(),
          farther_blk.contiguous(), total, carry_out)
    # a now holds dz
    return (scale * (a.transpose(-1, -2) @ k_rev), scale * (a @ q_blk), weights @ do_blk,
            total, carry_out)
