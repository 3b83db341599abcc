"""CoPE's band math on CPU as a small C++ kernel (``ops/csrc/cope_band.cpp``; built and
loaded by ``ops.native_build``).

Why by hand: most of a band's work is not its matmuls but the passes between them: the
gates, one reverse cumulative sum per row, the interpolation and the softmax; in the
backward, a scatter into the table and a cumulative sum of the position gradients. Scans
and scatters run along the keys, so torch does each as its own pass over a logit-sized
buffer, and torch.compile fuses only the elementwise ones between them. With the logits
transposed ([keys, rows]: rows are SIMD lanes and each lane keeps its own running sum),
the C++ does all of it in one sweep down the keys (the backward adds a cheap one back up)
and keeps one logit-sized buffer in the forward and four in the backward, where the fused
torch code keeps about ten. No library has such a kernel.

``forward_block`` and ``backward_block`` take and return what ``cope_blocks``' functions
do, so ``cope_blocks.kernels`` can hand out either.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from cope_megatron.ops import native_build


class _Band(ctypes.Structure):
    """``struct Band`` of the C++ source, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "problems", "blocks", "rows", "keys", "npos", "npos_max", "width", "causal")] + [
        ("scale", ctypes.c_double)] + [
        (name, ctypes.c_void_p) for name in ("row0", "key0", "z", "carry")]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None, with a warning, where it cannot be built (the band math
    then runs in torch, slower: see ``ops.cope.paths``)."""
    return native_build.load("cope_band", {
        f"cope_band_{name}_{suffix}": arity for name, arity in (("forward", 6), ("backward", 9))
        for suffix in ("f32", "f64")})


def _call(name: str, band, a, z, carry, scale: float, npos_max: int, *tensors) -> None:
    """Runs ``cope_band_{name}`` over logits a [..., n, L, B] (rows last)."""
    keys, rows = a.shape[-2:]
    if band is None:
        row0 = key0 = torch.zeros(1, dtype=torch.int64)
        width, causal = 0, False
    else:
        ids, key, width = band
        row0, key0, causal = ids[:, 0].contiguous(), key[:, 0].contiguous(), True
    args = _Band(problems=a.numel() // (keys * rows), blocks=a.shape[-3], rows=rows,
                 keys=keys, npos=z.shape[-1], npos_max=npos_max, width=width,
                 causal=causal, scale=scale, row0=row0.data_ptr(), key0=key0.data_ptr(),
                 z=z.data_ptr(), carry=carry.data_ptr())
    # The kernel walks raw pointers: every tensor dense, of one dtype.
    assert all(t.is_contiguous() and t.dtype == a.dtype for t in (z, carry, *tensors))
    suffix = {torch.float32: "f32", torch.float64: "f64"}[a.dtype]
    getattr(library(), f"cope_band_{name}_{suffix}")(
        ctypes.byref(args), *(t.data_ptr() for t in tensors))


def forward_block(q_blk, k_win, v_win, band, z_blk, carry_blk, scale: float, npos_max: int):
    """As ``cope_blocks.forward_block``."""
    a = k_win @ q_blk.transpose(-1, -2)  # [..., L, B]: the kernel's lanes are rows
    z, carry = z_blk.contiguous(), carry_blk.contiguous()
    hi, norm, unclamped, total = (torch.empty_like(carry) for _ in range(4))
    _call("forward", band, a, z, carry, scale, npos_max, a, hi, norm, unclamped, total)
    # a now holds exp(logit − row max), 0 off the band.
    out = (a.transpose(-1, -2) @ v_win) / norm[..., None]
    return out, hi + norm.log(), unclamped.long(), total


def backward_block(q_blk, k_win, v_win, band, z_blk, carry_blk, do_blk, lse_blk, delta_blk,
                   scale: float, npos_max: int):
    """As ``cope_blocks.backward_block``."""
    a = k_win @ q_blk.transpose(-1, -2)
    d = v_win @ do_blk.transpose(-1, -2)  # dO·vᵀ, transposed alike; becomes dL/da
    probs, dp = torch.empty_like(a), torch.empty_like(a)
    z, carry = z_blk.contiguous(), carry_blk.contiguous()
    dz, dp_sum = torch.empty_like(z), torch.empty_like(carry)
    _call("backward", band, a, z, carry, scale, npos_max, a, d, probs, dp,
          lse_blk.contiguous(), delta_blk.contiguous(), dz, dp_sum)
    return (scale * (d.transpose(-1, -2) @ k_win), scale * (d @ q_blk), probs @ do_blk, dz,
            dp_sum)
