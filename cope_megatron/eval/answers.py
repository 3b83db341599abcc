"""Greedy answers scored in one forward.

Greedy decoding of an answer is right exactly when, teacher-forced, every answer token is
the argmax of its position (each step then feeds back the true token), so one forward of
prompt + answer scores a sample. That forward is the ordinary one: it runs under TP (the
argmax is taken over vocabulary shards) and CP (answer positions on any rank) alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.model.gpt import model_batch, run_model


def answer_errors(model: torch.nn.Module, tokens: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Per sample, how many masked positions' argmax is not the next token (summed over
    CP ranks; vocabulary shards compared across TP ranks)."""
    batch = model_batch(model, tokens, mask=mask)
    logits = run_model(model, batch).float()  # [b, s, v/TP]
    best = logits.max(-1).values
    tp = parallel_state.get_tensor_model_parallel_group()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=tp)
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    local = batch["labels"] - start
    mine = (local >= 0) & (local < logits.shape[-1])
    target = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1)[..., None])[..., 0]
    target = torch.where(mine, target, 0.0)
    dist.all_reduce(target, group=tp)
    errors = ((target < best).float() * batch["mask"]).sum(-1)
    dist.all_reduce(errors, group=parallel_state.get_context_parallel_group())
    return errors
