"""CoPE's band math on CPU as a small C++ kernel (``csrc/cope_band.cpp``), built by the
machine's compiler on first use, cached on disk and called through ctypes.

Why by hand: most of a band's work is not its matmuls but the passes between them: the
gates, one reverse cumulative sum per row, the interpolation and the softmax; in the
backward, a scatter into the table and a cumulative sum of the position gradients. Scans
and scatters run along the keys, so torch does each as its own pass over a logit-sized
buffer, and torch.compile fuses only the elementwise ones between them. With the logits
transposed ([keys, rows]: rows are SIMD lanes and each lane keeps its own running sum),
the C++ does all of it in one sweep down the keys (the backward adds a cheap one back up)
and keeps one logit-sized buffer in the forward and four in the backward, where the fused
torch code keeps about ten. No library has such a kernel; a torch C++ extension would
compile torch's headers for a minute per machine, while this one includes none (raw
pointers) and builds in about a second.

``forward_block`` and ``backward_block`` take and return what ``cope_blocks``' functions
do, so ``cope_blocks.kernels`` can hand out either.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "cope_band.cpp"
# -fno-trapping-math lets the compiler turn the per-lane branches into vector selects.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
         "-std=c++17", "-shared", "-fPIC"]


class _Band(ctypes.Structure):
    """``struct Band`` of the C++ source, field for field."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "problems", "blocks", "rows", "keys", "npos", "npos_max", "width", "causal")] + [
        ("scale", ctypes.c_double)] + [
        (name, ctypes.c_void_p) for name in ("row0", "key0", "z", "carry")]


def _cache_dir() -> Path:
    return Path(os.environ.get("COPE_MEGATRON_CACHE", Path.home() / ".cache" / "cope_megatron"))


def _machine() -> bytes:
    """What -march=native compiles for: one cache entry per kind of CPU, so that a home
    directory shared across a cluster's nodes does not hand one node another's binary."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {flags}".encode()


def _build(cxx: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *FLAGS]).encode()
                         + _machine()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "cope_megatron"):
        path = folder / f"cope_band-{key}.so"
        if path.exists():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        # Ranks of one node may build at once: each writes its own file, renamed atomically.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True,
                           capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    raise OSError("no writable cache folder for the CoPE kernel (set COPE_MEGATRON_CACHE)")


def compiler() -> str | None:
    """The C++ compiler on PATH: $CXX, else g++, else c++ (None: none)."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None, with a warning, where it cannot be built (the band math
    then runs in torch, slower: see ``ops.cope.paths``)."""
    cxx = compiler()
    if cxx is None:
        warnings.warn("no C++ compiler (g++, c++ or $CXX) for the CoPE CPU kernel: the band "
                      "math runs in torch, eagerly and several times slower", stacklevel=2)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = (getattr(err, "stderr", "") or str(err)).strip()[-500:]
        warnings.warn(f"the CoPE CPU kernel {SOURCE.name} did not build with {cxx} "
                      f"({detail}): the band math runs in torch, slower", stacklevel=2)
        return None
    for name, arity in (("forward", 6), ("backward", 9)):
        for suffix in ("f32", "f64"):
            getattr(lib, f"cope_band_{name}_{suffix}").argtypes = [ctypes.c_void_p] * arity
            getattr(lib, f"cope_band_{name}_{suffix}").restype = None
    return lib


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
