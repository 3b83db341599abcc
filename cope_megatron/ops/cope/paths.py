"""Which code the chunked CoPE op runs where the device would decide: the one home of what
``auto`` picks on each device, and the switch that lets a CPU run another device's choice.

Three choices depend on the device:
    band   the band math (``ops.cope.blocks``): "eager" (torch, op by op), "native" (the C++
           kernel of ``ops.cope.native``, CPU only) or "compiled" (torch.compile: Triton on
           CUDA, C++ from Inductor on CPU)
    far    the plain attention beyond the band (``ops.plain_attention``): "flash" (the CPU's
           fused flash kernel, CPU only) or "matmul" (matrix products in row chunks)
    thread_heads  whether wide bands batch heads in multiples of the CPU's threads
``auto`` on CPU: the C++ kernel (torch.compile from ``COMPILE_MIN_SEQ`` keys if it did not
build, else eager), flash, thread_heads. On CUDA (and other devices): torch.compile from
``COMPILE_MIN_SEQ`` keys on (eager below: compiling costs seconds once per process),
matmul, no thread_heads. ``CUDA`` forces CUDA's choice at any length, on any device.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

from cope_megatron.ops import native_build
from cope_megatron.ops.cope import native as cope_native

Band = Literal["eager", "native", "compiled"]
Far = Literal["flash", "matmul"]

COMPILE_MIN_SEQ = 1024


@dataclass(frozen=True)
class Paths:
    """The chunked op's device-dependent choices; None leaves one to ``auto``."""

    band: Band | None = None
    far: Far | None = None
    thread_heads: bool | None = None

    def resolve(self, device: torch.device, keys: int) -> Paths:
        """Every choice made: the given ones, checked against the device, and ``auto``'s
        for the rest, for a call over ``keys`` keys."""
        if device.type != "cpu" and (self.band == "native" or self.far == "flash"):
            raise ValueError(f"CoPE paths {self} run on CPU only, not {device.type}")
        if self.band == "native" and cope_native.library() is None:
            raise RuntimeError("CoPE band='native': the C++ kernel did not build")
        auto = _auto(device, keys)
        return Paths(*(auto_value if value is None else value for value, auto_value in
                       zip(dataclasses.astuple(self), dataclasses.astuple(auto))))


CUDA = Paths(band="compiled", far="matmul", thread_heads=False)


def _auto(device: torch.device, keys: int) -> Paths:
    if device.type == "cpu":
        if cope_native.library() is not None:
            return Paths("native", "flash", True)
        return Paths(_compiled_or_eager(device, keys), "flash", True)
    return Paths(_compiled_or_eager(device, keys), "matmul", False)


def _compiled_or_eager(device: torch.device, keys: int) -> Band:
    return "compiled" if keys >= COMPILE_MIN_SEQ and can_compile(device.type) else "eager"


@functools.cache
def can_compile(device_type: str) -> bool:
    """Inductor emits C++ on CPU and Triton on GPU; without the toolchain, stay eager."""
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return native_build.compiler() is not None
