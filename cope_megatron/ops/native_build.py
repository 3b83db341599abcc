"""The C++ CPU kernels of ``csrc/``, built by the machine's compiler on first use, cached on
disk per kind of CPU and loaded through ctypes.

Why by hand: a torch C++ extension would compile torch's headers for a minute per machine,
while these kernels include none (they take raw pointers) and build in about a second.
Each kernel's Python side (``ops.cope.native``, ``ops.stickbreaking_native``) says why it
exists and what it computes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
# -fno-trapping-math lets the compiler turn the per-lane branches into vector selects.
# -fno-tree-pre: GCC 12's partial redundancy elimination threads the exp's clamps into
# separate paths with constant results, and the loop, no longer one block, stays scalar:
# stick-breaking's forward ran 7× slower per logit. On x86, AVX-512 at full width where the
# CPU has it: 10-25 % faster on these kernels (GCC defaults to 256-bit vectors on recent
# Intel parts).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
         "-fno-tree-pre", "-std=c++17", "-shared", "-fPIC"] + (
    ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])


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


@functools.cache
def _compiler_version(cxx: str) -> bytes:
    """``cxx --version``: one cache entry per compiler release, so that an upgraded
    compiler (or one at the same path on another node) builds its own."""
    done = subprocess.run([cxx, "--version"], capture_output=True, check=False)
    return done.stdout + done.stderr


def _build(source: Path, cxx: str) -> Path:
    headers = b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join([cxx, *FLAGS]).encode()
                         + _compiler_version(cxx) + _machine()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / "cope_megatron"):
        path = folder / f"{source.stem}-{key}.so"
        if path.exists():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if not os.access(folder, os.W_OK):  # e.g. a home directory read-only on compute nodes
            continue
        # Ranks, and nodes sharing a home directory, may build at once: each writes its own
        # file (PIDs repeat across nodes' containers), renamed into place atomically.
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            subprocess.run([cxx, *FLAGS, str(source), "-o", str(tmp)], check=True,
                           capture_output=True, text=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    raise OSError(f"no writable cache folder for {source.name} (set COPE_MEGATRON_CACHE)")


def compiler() -> str | None:
    """The C++ compiler on PATH: $CXX, else g++, else c++ (None: none)."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def load(name: str, arities: dict[str, int]) -> ctypes.CDLL | None:
    """``csrc/{name}.cpp`` built (or found in the cache) and loaded, each of its functions in
    ``arities`` declared to take that many pointers and return nothing; None, with a
    warning, where it cannot be built (callers then run the same math in torch, slower)."""
    source = CSRC / f"{name}.cpp"
    cxx = compiler()
    if cxx is None:
        warnings.warn(f"no C++ compiler (g++, c++ or $CXX) for {source.name}: its math runs "
                      "in torch, eagerly and several times slower", stacklevel=3)
        return None
    try:
        lib = ctypes.CDLL(str(_build(source, cxx)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = (getattr(err, "stderr", "") or str(err)).strip()[-500:]
        warnings.warn(f"{source.name} did not build with {cxx} ({detail}): its math runs in "
                      "torch, slower", stacklevel=3)
        return None
    for function, arity in arities.items():
        getattr(lib, function).argtypes = [ctypes.c_void_p] * arity
        getattr(lib, function).restype = None
    return lib
