"""Greedy answers under any parallel layout, in as few forwards as the model's mistakes.

``argmax_ids`` gives the next-token argmax at every global position on every rank: the
vocabulary argmax across TP shards (max value, then lowest index among the shards that
hold it: torch.argmax's first-maximum rule) and CP ranks' positions gathered. ``greedy``
decodes the answer slot of samples in place: one forward with the gold answer gives, at
every answer position, the greedy token as long as the prefix is still the gold one, so
the first mismatch is the first generated token that differs; it is set and the rest
re-read in the next forward. A correct answer costs one forward; each wrong token at
most one more. Generation reuses the fixed window (the answer slot ends it), so the
shapes CP needs never change, and causal attention makes what follows a position
irrelevant to its prediction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.model.gpt import model_batch, run_model


def vocab_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[b, s] argmax of vocab-parallel ``logits`` [b, s, v/TP], the same on every TP rank."""
    best, index = logits.max(-1)
    tp = parallel_state.get_tensor_model_parallel_group()
    top = best.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp)
    index = index + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    index = torch.where(best == top, index, torch.iinfo(torch.int64).max)
    dist.all_reduce(index, op=dist.ReduceOp.MIN, group=tp)
    return index


def argmax_ids(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] argmax next token at each position of ``tokens`` [b, s + 1]'s inputs."""
    batch = model_batch(model, tokens)
    logits = run_model(model, batch).float()  # [b, s/CP, v/TP]
    index = vocab_argmax(logits)
    ids = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.int64,
                      device=tokens.device)
    ids.scatter_(1, batch["position_ids"], index)
    dist.all_reduce(ids, group=parallel_state.get_context_parallel_group())
    return ids


def greedy(model: torch.nn.Module, tokens: torch.Tensor, answer: int
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(generated [b, answer] ids, teacher-forced hits [b, answer]: whether each gold answer
    token is the argmax given the gold prefix, forwards run) for ``tokens`` [b, s + 1]
    whose last ``answer`` tokens are the gold answer."""
    buf = tokens.clone()
    first = buf.shape[1] - answer  # the answer slot's first token
    done = torch.zeros(buf.shape[0], dtype=torch.int64, device=buf.device)  # settled tokens
    forced, forwards = None, 0
    while bool((done < answer).any()):
        pred = argmax_ids(model, buf)[:, first - 1:]  # predictions of the slot's tokens
        forwards += 1
        if forced is None:
            forced = pred == tokens[:, first:]
        for row in range(buf.shape[0]):
            slot = buf[row, first:]
            wrong = (pred[row] != slot).nonzero()
            miss = [int(j) for j in wrong[:, 0] if j >= done[row]]
            if not miss:
                done[row] = answer
                continue
            slot[miss[0]] = pred[row, miss[0]]
            done[row] = miss[0] + 1
    return buf[:, first:], forced, forwards
