"""FIRE: functional interpolation for relative positions (Li et al. 2023, arXiv 2310.04418,
§3, eq. 3 with the log transform of §3.2).

Query i and key j ≤ i get the logit bias, one value per head,

    b(i, j) = f_θ( ψ(i − j) / ψ(max(L, i)) ),   ψ(x) = log(c·x + 1),

with f_θ a 2-layer ReLU MLP from one input to every head (``pe.fire.mlp_width`` hidden
units), c and the threshold L learned. As in the paper's code, ψ takes |c|, L is learned
as a multiplier of its initial value (L = |λ|·``pe.fire.threshold_init``, λ = 1 at start),
the normalizer gets ε = 1e-6, i is the 0-based query position, and the MLP starts as
PyTorch's ``nn.Linear`` does. Each layer has its own FIRE (the paper's default).

Progressive interpolation: j ≤ i ≤ max(L, i) makes the MLP's input lie in [0, 1] at every
length, so a model run far beyond its training length evaluates f_θ only where it was
trained; this is why FIRE extrapolates. The price: the bias depends on the query position,
not on i − j alone, so it has no O(s) table: it is a ``PositionBias`` computed per block.

Tensor parallelism: the output layer's rows are heads, split over TP ranks like T5's
table; c, λ and the first layer are replicated, and since each rank's loss reaches them
through its own heads only, their gradient is summed over the TP group (Megatron's
``copy_to_tensor_model_parallel_region``: identity forward, all-reduce backward).
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from torch import nn

from cope_megatron.config import Config, ConfigError, PEConfig
from cope_megatron.ops.position_bias import PositionBias
from cope_megatron.pe import register
from cope_megatron.pe.base import (
    AttentionShape,
    CausalAttention,
    PositionEncoding,
    head_sharded_parameter,
)

EPS = 1e-6
"""Added to the normalizer ψ(max(L, i)) (the paper's code)."""


def fire_input(q_pos: torch.Tensor, k_pos: torch.Tensor, c: torch.Tensor,
               threshold: torch.Tensor) -> torch.Tensor:
    """ψ(i − j) / ψ(max(L, i)), in [0, 1] for 0 ≤ j ≤ i: the MLP's input. Positions are
    taken in c's dtype, which must hold them exactly (fp32 or fp64)."""
    i = q_pos.to(c.dtype)
    d = (q_pos - k_pos).clamp(min=0).to(c.dtype)
    return torch.log1p(c.abs() * d) / (torch.log1p(c.abs() * torch.maximum(i, threshold)) + EPS)


def _mlp_terms(q_pos, k_pos, c, threshold_scale, in_weight, in_bias, out_weight, out_bias,
               threshold_init: float) -> tuple[torch.Tensor, ...]:
    """The MLP's input and weights, (x, w1, b1, w2, b2), in at least fp32: bf16 cannot tell
    positions above 256 apart."""
    dtype = torch.promote_types(in_weight.dtype, torch.float32)
    c, scale, w1, b1, w2, b2 = (t.to(dtype) for t in (
        c, threshold_scale, in_weight, in_bias, out_weight, out_bias))
    return fire_input(q_pos, k_pos, c[0], (scale[0] * threshold_init).abs()), w1, b1, w2, b2


def fire_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, c: torch.Tensor,
              threshold_scale: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor,
              out_weight: torch.Tensor, out_bias: torch.Tensor, *,
              threshold_init: float) -> torch.Tensor:
    """[heads, *shape] for positions broadcasting to ``shape``. c, threshold_scale: [1];
    in_weight, in_bias: [width]; out_weight [heads, width], out_bias [heads]; computed in
    at least fp32 (``_mlp_terms``)."""
    x, w1, b1, w2, b2 = _mlp_terms(q_pos, k_pos, c, threshold_scale, in_weight, in_bias,
                                   out_weight, out_bias, threshold_init)
    hidden = torch.relu(x[..., None] * w1 + b1)  # [*shape, width]
    return (hidden @ w2.T + b2).movedim(-1, 0)


def fire_score(q_pos: torch.Tensor, k_pos: torch.Tensor, head: torch.Tensor, c: torch.Tensor,
               threshold_scale: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor,
               out_weight: torch.Tensor, out_bias: torch.Tensor, *,
               threshold_init: float) -> torch.Tensor:
    """``fire_bias`` of one head at one (query, key) pair, for FlexAttention's score_mod:
    the output layer's product unrolled into one term per hidden unit, since compiled
    FlexAttention cannot lower a reduction inside a score_mod."""
    x, w1, b1, w2, b2 = _mlp_terms(q_pos, k_pos, c, threshold_scale, in_weight, in_bias,
                                   out_weight, out_bias, threshold_init)
    total = b2[head]
    for unit in range(w1.shape[0]):
        total = total + torch.relu(x * w1[unit] + b1[unit]) * w2[head, unit]
    return total


class FireAttention(CausalAttention):
    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__(shape, options)
        o = options.fire
        self.threshold_init = o.threshold_init
        self.tp_size = shape.tp_size
        self.c = nn.Parameter(torch.full((1,), o.c_init))
        self.threshold_scale = nn.Parameter(torch.ones(1))
        # nn.Linear's init, U(±1/√fan_in), drawn whole on every rank so that it does not
        # depend on TP.
        self.mlp_in_weight = nn.Parameter(_uniform(o.mlp_width, bound=1.0))
        self.mlp_in_bias = nn.Parameter(_uniform(o.mlp_width, bound=1.0))
        bound = 1 / math.sqrt(o.mlp_width)
        self.mlp_out_weight = head_sharded_parameter(
            _uniform(shape.total_heads, o.mlp_width, bound=bound), shape)
        self.mlp_out_bias = head_sharded_parameter(_uniform(shape.total_heads, bound=bound),
                                                   shape)

    def position_bias(self, length: int, device: torch.device) -> PositionBias:
        replicated = [self.c, self.threshold_scale, self.mlp_in_weight, self.mlp_in_bias]
        if self.tp_size > 1 and torch.is_grad_enabled():
            replicated = [copy_to_tensor_model_parallel_region(p) for p in replicated]
        return PositionBias(functools.partial(fire_bias, threshold_init=self.threshold_init),
                            (*replicated, self.mlp_out_weight, self.mlp_out_bias),
                            at=functools.partial(fire_score, threshold_init=self.threshold_init))


def _uniform(*size: int, bound: float) -> torch.Tensor:
    return (2 * torch.rand(*size) - 1) * bound


def check(cfg: Config) -> None:
    o = cfg.pe.fire
    if not o.threshold_init > 0:
        raise ConfigError(f"pe.fire.threshold_init: the threshold L must be positive, got "
                          f"{o.threshold_init}; the paper's code starts at 512")
    if not o.c_init > 0:
        raise ConfigError(f"pe.fire.c_init: c of ψ(x) = log(c·x + 1) must be positive, got "
                          f"{o.c_init}; the paper's code starts at 0.1")
    if o.mlp_width < 1:
        raise ConfigError(f"pe.fire.mlp_width: must be at least 1, got {o.mlp_width}")


register(PositionEncoding(
    name="fire", attention=FireAttention, check=check, options=("fire",),
    # The MLP's hidden layer, and ψ's four [s, s] intermediates (measured in the tests).
    bias_saved=lambda cfg: cfg.pe.fire.mlp_width + 4))
