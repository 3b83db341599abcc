"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300): a number hidden at some
depth of filler text, asked for at the end; accuracy of greedy decoding, per length and
depth.

Scored by ``answer_errors``: one teacher-forced forward of prompt + answer per sample.
Prompts are built from the run's own tokenizer.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.config import EvalConfig
from cope_megatron.data.tokenizer import Tokenizer
from cope_megatron.eval.answers import answer_errors
from cope_megatron.eval.context import EvalContext
from cope_megatron.model.gpt import eval_mode, max_positions

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


class PromptTooLongError(ValueError):
    """The fixed parts of the prompt alone exceed the length."""


def passkey_sample(tokenizer: Tokenizer, length: int, depth: float,
                   key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [length + 1], answer mask [length]): intro, filler with the key sentence at
    ``depth`` (0 = right after the intro, 1 = right before the question), question, answer;
    the mask marks the predictions of the answer's tokens."""
    # Segments are encoded apart and joined, each with its leading space
    # (``encode_part``), so the answer reads " 54321" as it would in running text.
    enc = tokenizer.encode_part
    intro, key_ids = enc(INTRO), enc(KEY.format(key=key))
    question, answer, sentence = enc(QUESTION), enc(str(key)), enc(FILLER)
    room = length + 1 - len(intro) - len(key_ids) - len(question) - len(answer)
    if room < 0:
        raise PromptTooLongError(f"a passkey prompt needs more than {length} tokens")
    filler = (sentence * (room // len(sentence) + 1))[:room]
    cut = round(depth * room)
    ids = intro + filler[:cut] + key_ids + filler[cut:] + question + answer
    mask = torch.zeros(length)
    mask[length - len(answer):] = 1
    return torch.tensor(ids), mask


@torch.no_grad()
def passkey_accuracy(ctx: EvalContext, e: EvalConfig, seed: int) -> dict:
    """{length: {depth: accuracy, ..., "samples": n} or {"status": "not applicable"}} for
    ``e.passkey_samples`` keys drawn from ``seed`` per length and depth."""
    tokenizer = ctx.tokenizer()
    rng = random.Random(seed)
    limit = max_positions(ctx.model)
    with eval_mode(ctx.model):
        results: dict = {}
        for mult in e.length_multipliers:
            length = mult * ctx.train_length
            if limit is not None and length > limit:
                results[length] = {"status": "not applicable",
                                   "reason": f"no positions beyond {limit}"}
                continue
            try:
                passkey_sample(tokenizer, length, 0.0, 10_000)
            except PromptTooLongError as err:
                results[length] = {"status": "not applicable", "reason": str(err)}
                continue
            results[length] = {"samples": e.passkey_samples}
            for depth in e.passkey_depths:
                hits = torch.zeros(2, device=ctx.device)  # [correct, scored]
                for i in range(e.passkey_samples):
                    key = rng.randrange(10_000, 100_000)  # drawn on every rank: same prompts
                    if not ctx.takes(i):
                        continue
                    tokens, mask = passkey_sample(tokenizer, length, depth, key)
                    errors = answer_errors(ctx.model, tokens[None].to(ctx.device),
                                           mask[None].to(ctx.device))
                    hits += torch.stack([(errors == 0).float().sum(), hits.new_tensor(1.0)])
                dist.all_reduce(hits, group=parallel_state.get_data_parallel_group())
                results[length][str(depth)] = (hits[0] / hits[1]).item()
    return results
