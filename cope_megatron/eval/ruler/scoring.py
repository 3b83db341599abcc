"""Both ways to score a sample, from one greedy decode (``decode.greedy``):

- ``teacher_forced``: 1 when every answer token is the argmax given the gold prefix, else
  0 (the exact-match verdict of greedy decoding, readable from small models' logits);
- ``greedy``: the decoded answer slot as text, scored as RULER scores generations
  (``string_match_all``): the fraction of the answer's strings found in it, case-blind
  and as whole words, in any order (multi-value, extraction).

Data-parallel ranks take alternate batches; their sums meet on every rank.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.eval.context import EvalContext
from cope_megatron.eval.ruler.decode import argmax_ids, greedy
from cope_megatron.eval.ruler.prompt import Encoder, Sample

METHODS = ("teacher_forced", "greedy")


def string_match(text: str, references: tuple[str, ...]) -> float:
    """Fraction of ``references`` in ``text`` as whole words (case-blind)."""
    found = [re.search(rf"(?<![\w-]){re.escape(r)}(?![\w-])", text, re.IGNORECASE)
             for r in references]
    return sum(f is not None for f in found) / len(references)


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Samples of equal answer length together (one answer slot per batch), in order."""
    by_answer: dict[int, list[Sample]] = {}
    for s in samples:
        by_answer.setdefault(s.answer, []).append(s)
    return [group[i:i + batch_size] for group in by_answer.values()
            for i in range(0, len(group), batch_size)]


@torch.no_grad()
def score_samples(ctx: EvalContext, samples: list[Sample], methods: list[str],
                  batch_size: int, enc: Encoder) -> tuple[dict[str, float], int]:
    """(mean score per method in ``methods`` over ``samples``, tokens the model read for
    them over every forward) with the model in eval mode."""
    totals = torch.zeros(len(METHODS) + 1, dtype=torch.float64, device=ctx.device)
    for i, batch in enumerate(_batches(samples, batch_size)):
        if not ctx.takes(i):
            continue
        tokens = torch.tensor([s.tokens for s in batch], device=ctx.device)
        answer = batch[0].answer
        if "greedy" in methods:
            generated, forced, forwards = greedy(ctx.model, tokens, answer)
            texts = [enc.decode(row.tolist()) for row in generated]
            totals[1] += sum(string_match(t, s.references) for t, s in zip(texts, batch))
        else:
            forced = argmax_ids(ctx.model, tokens)[:, -answer:] == tokens[:, -answer:]
            forwards = 1
        totals[0] += forced.all(-1).double().sum()
        totals[-1] += forwards * (tokens.numel() - len(batch))
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    means = {m: totals[METHODS.index(m)].item() / len(samples) for m in methods}
    return means, int(totals[-1].item())
