"""The position-encoding interface shared by every registry entry.

A PE touches a GPT in at most three places, each with a do-nothing default:
- ``gpt_position_embedding``: what Megatron's GPTModel adds natively ("none",
  "learned_absolute" or "rope");
- ``position_embedding``: a module built as ``(hidden_size, dtype)`` that replaces
  GPTModel's learned table (position ids [b, s] -> [b, s, hidden]), for fixed additive
  encodings;
- ``attention``: the core attention, on [b, heads, s, head_dim] tensors, where
  logit biases (ALiBi, T5, Kerple, FIRE) and CoPE live. It takes the context-parallel group
  when the sequence is split over ranks, and hands the exchange to ``ops.context_parallel``
  (with document boundaries also ``starts``, each token's document start);
  with ``token_gate``, also a logit per head and token computed from the layer's input
  (FoX's forget gate), as ``gate`` [b, heads, s].

A parameter split over TP ranks by head is made with ``head_sharded_parameter``, whose tag
is the one record of that fact: checkpoint conversion and export read it
(``checkpoint.universal.checkpoint_info``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import nn

from cope_megatron.config import Config, PEConfig
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.context_parallel.softmax import ring_attention
from cope_megatron.ops.flex_bias import flex_bias_attention
from cope_megatron.ops.position_bias import PositionBias, distance_bias

AUTO_FLEX_ON_CUDA = False
"""``pe.bias_kernel=auto`` on CUDA: FlexAttention once the GPU suite has measured it faster
than the materialized bias (``bench/gpu_suite.sh``, stages b and c); CPU stays materialized
(FlexAttention has no backward there)."""


@dataclass(frozen=True)
class AttentionShape:
    """What a PE's attention module needs to know about its layer and TP shard."""

    num_heads: int
    """Query heads on this tensor-parallel rank."""
    num_kv_heads: int
    head_dim: int
    total_heads: int
    """Query heads of the whole layer, across TP ranks."""
    head_offset: int
    """Global index of this rank's first head: per-head state is indexed by global head."""
    softmax_scale: float
    dropout: float
    init_std: float
    tp_size: int = 1

    @classmethod
    def of_rank(cls, *, total_heads: int, total_kv_heads: int, head_dim: int, tp_size: int = 1,
                tp_rank: int = 0, softmax_scale: float | None = None, dropout: float = 0.0,
                init_std: float = 0.02) -> AttentionShape:
        """The shape on TP rank ``tp_rank`` of ``tp_size`` (heads split evenly)."""
        heads = total_heads // tp_size
        return cls(num_heads=heads, num_kv_heads=total_kv_heads // tp_size, head_dim=head_dim,
                   total_heads=total_heads, head_offset=tp_rank * heads,
                   softmax_scale=softmax_scale or 1.0 / math.sqrt(head_dim), dropout=dropout,
                   init_std=init_std, tp_size=tp_size)


def uses_flex(bias_kernel: str, device_type: str, dropout: float) -> bool:
    """Whether ``pe.bias_kernel`` sends a position bias to FlexAttention on ``device_type``
    (rather than a materialized SDPA mask), on one context-parallel rank. FlexAttention has
    no dropout: ``auto`` keeps the materialized bias with attention dropout, and ``flex``
    with dropout is refused by the config check."""
    if bias_kernel == "auto":
        return AUTO_FLEX_ON_CUDA and device_type == "cuda" and dropout == 0
    return bias_kernel == "flex"


class CausalAttention(nn.Module):
    """Plain causal softmax attention (PyTorch SDPA); the base of biased variants.

    A biased variant defines its bias once, as a function of global query and key positions
    (``position_bias``, an ``ops.position_bias.PositionBias``), which every path reads: the
    materialized bias of one process, FlexAttention, and the context-parallel ring
    (``ops.context_parallel.softmax``), which applies it at global positions. A bias of the
    distance i − j alone defines ``distance_bias`` instead, a [heads, length] vector.
    """

    def __init__(self, shape: AttentionShape, options: PEConfig) -> None:
        super().__init__()
        self.shape = shape
        self.bias_kernel = options.bias_kernel

    def distance_bias(self, length: int, device: torch.device) -> torch.Tensor | None:
        """Logit bias per head for distances 0..length−1, [heads, length]; None for none."""
        return None

    def position_bias(self, length: int, device: torch.device) -> PositionBias | None:
        """The logit bias of this rank's heads at positions 0..length−1 (global positions
        under context parallelism); None for none. By default ``distance_bias``."""
        table = self.distance_bias(length, device)
        return None if table is None else distance_bias(table)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cp: ContextParallel | None = None, starts: torch.Tensor | None = None
                ) -> torch.Tensor:
        # q: [b, h, s, d]; k, v: [b, g, s, d] -> [b, h, s, d] (s: this rank's tokens);
        # starts: document starts under CP (one process runs each document alone)
        s = q.shape[2]
        if cp is not None:
            bias = self.position_bias(s * cp.size, q.device)
            return ring_attention(q, k, v, cp, softmax_scale=self.shape.softmax_scale,
                                  bias=bias, starts=starts)
        bias = self.position_bias(s, q.device)
        if bias is None:
            return self._sdpa(q, k, v, None)
        if uses_flex(self.bias_kernel, q.device.type, self.shape.dropout):
            return flex_bias_attention(q, k, v, bias, softmax_scale=self.shape.softmax_scale)
        if torch.is_grad_enabled():  # training: one [s, s] bias, SDPA's fused backward
            return self._sdpa(q, k, v, _causal_bias(bias, 0, s, q))
        # Evaluation: query blocks against their keys, so memory is linear in s and a
        # context many times the training length fits.
        return torch.cat([
            self._sdpa(q[:, :, i0:i0 + EVAL_BLOCK], k[:, :, :i0 + EVAL_BLOCK],
                       v[:, :, :i0 + EVAL_BLOCK],
                       _causal_bias(bias, i0, min(s, i0 + EVAL_BLOCK), q))
            for i0 in range(0, s, EVAL_BLOCK)], dim=2)

    def _sdpa(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.shape.dropout if self.training else 0.0,
            scale=self.shape.softmax_scale,
            enable_gqa=self.shape.num_kv_heads != self.shape.num_heads,
        )


EVAL_BLOCK = 1024
"""Query rows per block of biased attention at evaluation."""


def _causal_bias(bias: PositionBias, i0: int, i1: int, like: torch.Tensor) -> torch.Tensor:
    """[h, i1 − i0, i1] on ``like``'s device and dtype: the bias of query rows i0..i1
    against keys 0..i1, −∞ for keys after the row."""
    rows, cols = torch.arange(i0, i1, device=like.device), torch.arange(i1, device=like.device)
    future = cols[None, :] > rows[:, None]
    return bias.block(rows, cols).to(like.dtype).masked_fill(future, float("-inf"))


@dataclass(frozen=True)
class PositionEncoding:
    """One registry entry: how a PE plugs into Megatron's GPTModel, and every fact the rest
    of the system asks of a PE (nothing else guesses them from its name)."""

    name: str
    attention: type[nn.Module] = CausalAttention
    gpt_position_embedding: Literal["none", "learned_absolute", "rope"] = "none"
    position_embedding: type[nn.Module] | None = None
    extrapolates: bool = True
    """False when positions beyond the training length have no representation."""
    uses_cope_op: bool = False
    """Its attention runs the CoPE op (``ops.cope_attention``): ``pe.cope`` applies, and
    the op's table product, elementwise work and fp32 copies count in FLOPs and memory."""
    hf_architecture: Literal["gpt_neox", "gpt2"] | None = None
    """The standard ``transformers`` architecture that computes it exactly, where the rest
    of the model allows (``hf.standard``); None: ``hf/modeling_cope_megatron.py``."""
    check: Callable[[Config], None] | None = None
    """Its own start-up check of a run config (ConfigError naming the key)."""
    token_gate: bool = False
    """Its attention takes a logit per head and token from a projection of the layer's
    input (``model.token_gate``): FoX's forget gate, which core attention, seeing only q,
    k and v, cannot compute."""
    elementwise_per_key: int = 0
    """Elementwise operations per visible key and head beyond softmax attention's (CoPE's
    are ``estimate.flops.COPE_ELEMENTWISE_PER_KEY``), counted apart from MFU."""
    fp32_output: bool = False
    """Its op keeps its output in fp32 for backward (for softmax's rowsum(dO·O), or
    stick-breaking's rows' Σ dL): under bf16 training a copy besides the bf16 one, which
    ``estimate.memory`` counts."""
    bias_saved: Callable[[Config], int] | None = None
    """fp32 elements per (query, key) pair that computing its bias keeps for backward on
    the materialized path, besides the [heads, s, s] bias itself (FIRE's MLP activations;
    ``estimate.memory`` counts them)."""
    options: tuple[str, ...] = ()
    """The ``pe.<section>``s it reads: a resume may change the sections that no PE of the
    model reads (``training/resume.py``)."""

    def per_layer(self, num_layers: int) -> tuple[PositionEncoding, ...]:
        """The PE of each layer (a ``pe.schedule.PESchedule`` varies it)."""
        return (self,) * num_layers

    @property
    def rotary(self) -> bool:
        """Queries and keys are rotated by Megatron's RoPE before the attention."""
        return self.gpt_position_embedding == "rope"

    @property
    def biased(self) -> bool:
        """The attention adds a position bias to the logits (ALiBi, T5, Kerple, FIRE)."""
        return issubclass(self.attention, CausalAttention) and (
            self.attention.distance_bias is not CausalAttention.distance_bias
            or self.attention.position_bias is not CausalAttention.position_bias)


def head_sharded_parameter(full: torch.Tensor, shape: AttentionShape) -> nn.Parameter:
    """This TP rank's rows (dim 0 = global head) of a per-head tensor, as a parameter
    tagged tensor-parallel, so that DeepSpeed's gradient norm counts every shard once.
    ``full`` is built whole on every rank: the same seed gives the same model at any TP."""
    rows = full[shape.head_offset: shape.head_offset + shape.num_heads].clone()
    param = nn.Parameter(rows)
    tensor_parallel.set_tensor_model_parallel_attributes(param, True, 0, 1)
    return param
