"""Causal attention with a position bias on FlexAttention (a flash-class kernel), never
materialized as [s, s]: a bias of distance alone is read inside the kernel as
``table[h, i − j]``; any other (``ops.position_bias``) is evaluated per score from
(q_idx, kv_idx) by its own function.

On CUDA ``flex_attention`` is compiled (uncompiled it materializes the scores); on CPU it
runs eager and forward only (torch 2.13 has no FlexAttention backward on CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from cope_megatron.ops.position_bias import PositionBias


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def causal_block_mask(length: int, device: torch.device) -> BlockMask:
    """The causal block mask for ``length`` tokens on ``device``, built once: blocks above
    the diagonal are skipped, not computed and masked."""
    # _compile: built without the dense [s, s] mask, which at 32k would be 1 GiB.
    return create_block_mask(_causal, None, None, length, length, device=device,
                             _compile=device.type == "cuda")


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: PositionBias,
                        *, softmax_scale: float) -> torch.Tensor:
    """q: [b, h, s, d]; k, v: [b, g, s, d] (g divides h); ``bias`` of this rank's h heads at
    positions 0..s−1 -> [b, h, s, d]. Gradients reach q, k, v and the bias's tensors."""
    # In at least fp32: the compiled backward scatters a captured tensor's gradient with
    # atomic adds into a buffer of its dtype (pytorch#137452), and one entry of a T5 table,
    # or one weight of FIRE's MLP, sums the gradients of hundreds to millions of scores.
    bias = dataclasses.replace(bias, tensors=tuple(
        t.to(torch.promote_types(t.dtype, torch.float32)) for t in bias.tensors))
    table = bias.distance_table
    if table is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            # Entries above the diagonal are masked by the block mask, but partial blocks
            # still evaluate them: clamp so their (discarded) index stays in range.
            return score + table[h, (q_idx - kv_idx).clamp(min=0)]
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias.score(q_idx, kv_idx, h)

    attend = _compiled_flex() if q.is_cuda else flex_attention
    return attend(q, k, v, score_mod=score_mod,
                  block_mask=causal_block_mask(q.shape[2], q.device), scale=softmax_scale,
                  enable_gqa=k.shape[1] != q.shape[1])
