"""Kerple: kernelized relative positional embedding (Chi et al. 2022, arXiv 2205.09921, §4).

Head h adds a conditionally positive definite kernel of the distance i − j to the logit of
query i and key j, with r₁, r₂ > 0 learned per head (``pe.kerple.variant``):
  log    −r₁·log(1 + r₂·(i − j))      (the paper's best, eq. "logarithmic variant")
  power  −r₁·(i − j)^r₂, 0 < r₂ ≤ 2   (eq. "power variant"; CPD only for r₂ ≤ 2)
Initialization follows the authors' code: per head, the log variant draws r₁ ~ U(0, 2) and
r₂ ~ U(0, 1); the power variant draws the exponent r₂ ~ U(0, 2) and the scale r₁ ~ U(0, 1).

Positivity: the authors' code clamps the parameters' ``.data`` in place before every
forward (r ≥ 0.01, the exponent ≤ 2), a projected gradient step. An in-place edit of a
parameter is not seen by DeepSpeed's fp32 master weights under bf16 training or ZeRO, so
here the constraint is a smooth parameterization: r = softplus(ρ) + 0.01, and the exponent
r₂ = 0.01 + (max_exponent − 0.01)·sigmoid(ρ₂), the same ranges. Parameters are indexed by
global head and split over TP ranks like T5's table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cope_megatron.config import Config, ConfigError, PEConfig
from cope_megatron.pe import register
from cope_megatron.pe.base import (
    AttentionShape,
    CausalAttention,
    PositionEncoding,
    head_sharded_parameter,
)

FLOOR = 0.01
"""The authors' lower bound of r₁ and r₂ (their ``eps``)."""


def positive(raw: torch.Tensor) -> torch.Tensor:
    """r > FLOOR from the unconstrained ρ."""
    return F.softplus(raw) + FLOOR


def positive_inverse(r: torch.Tensor) -> torch.Tensor:
    """ρ with positive(ρ) = r, for r > FLOOR."""
    x = r - FLOOR
    return x + torch.log(-torch.expm1(-x))


def exponent(raw: torch.Tensor, max_exponent: float) -> torch.Tensor:
    """The power variant's r₂ in (FLOOR, max_exponent) from the unconstrained ρ₂."""
    return FLOOR + (max_exponent - FLOOR) * torch.sigmoid(raw)


def exponent_inverse(r: torch.Tensor, max_exponent: float) -> torch.Tensor:
    return torch.logit((r - FLOOR) / (max_exponent - FLOOR))


def kerple_bias(distance: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,
                variant: str) -> torch.Tensor:
    """[heads, *distance.shape]: the kernel of non-negative distances, r1 and r2 [heads]."""
    d = distance.to(r1.dtype)
    r1, r2 = (r.reshape(-1, *([1] * d.dim())) for r in (r1, r2))
    if variant == "log":
        return -r1 * torch.log1p(r2 * d)
    # d^r2 at d = 0 is 0, but its derivative in r2, d^r2·log d, is 0·(−∞): take it at
    # d = 1 (where it is 0) and select 0 afterwards.
    return -r1 * torch.where(d > 0, d.clamp(min=1) ** r2, torch.zeros_like(d))


def _uniform(n: int, high: float) -> torch.Tensor:
    """n draws from U(FLOOR, high), kept off both ends (where the inverses are infinite)."""
    return FLOOR + (high - FLOOR) * torch.rand(n).clamp(1e-3, 1 - 1e-3)


class KerpleAttention(CausalAttention):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__(shape, options)
        self.variant = options.kerple.variant
        self.max_exponent = options.kerple.max_exponent
        # Drawn whole on every rank, so that init does not depend on TP; strictly inside
        # the open ranges the parameterization reaches.
        n = shape.total_heads
        if self.variant == "log":
            r1, r2 = _uniform(n, 2), _uniform(n, 1)
            r2_raw = positive_inverse(r2)
        else:
            r1, r2 = _uniform(n, 1), _uniform(n, self.max_exponent)
            r2_raw = exponent_inverse(r2, self.max_exponent)
        self.r1_raw = head_sharded_parameter(positive_inverse(r1), shape)
        self.r2_raw = head_sharded_parameter(r2_raw, shape)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r₁, r₂) of this rank's heads."""
        r2 = (positive(self.r2_raw) if self.variant == "log"
              else exponent(self.r2_raw, self.max_exponent))
        return positive(self.r1_raw), r2

    def distance_bias(self, length: int, device: torch.device) -> torch.Tensor:
        return kerple_bias(torch.arange(length, device=device), *self.coefficients(),
                           self.variant)


def check(cfg: Config) -> None:
    top = cfg.pe.kerple.max_exponent
    if not (FLOOR < top <= 2) or math.isnan(top):
        raise ConfigError(
            f"pe.kerple.max_exponent: must be in ({FLOOR}, 2], got {top}; the power kernel "
            "−r₁·|i − j|^r₂ is conditionally positive definite only for 0 < r₂ ≤ 2 "
            "(Chi et al. 2022)")


register(PositionEncoding(name="kerple", attention=KerpleAttention, check=check,
                          options=("kerple",)))
