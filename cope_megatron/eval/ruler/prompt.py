"""A generated prompt of exact length: intro, haystack with needles at their depths,
question, answer; and the haystacks it is cut from.

Every part is encoded on its own and the token lists joined (``Tokenizer.encode_part``
gives each its leading space), so a value reads the same tokens in its needle as in the
answer: the answer is a copy, in tokens, of what the haystack hides, and a prompt's length
is the sum of its parts', exact for the run's tokenizer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cope_megatron.data.tokenizer import Tokenizer
from cope_megatron.eval.passkey import PromptTooLongError
from cope_megatron.eval.ruler.words import NOISE

__all__ = ["PromptTooLongError", "HaystackError", "Haystack", "Sample", "Encoder", "assemble",
           "occurrences"]

RETRIES = 20
"""Haystack cuts tried before giving up on one free of the answer."""


class HaystackError(ValueError):
    """No usable haystack: empty, or every cut of it contains the answer."""


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    """length + 1 token ids: the model reads the first length and predicts the last."""
    answer: int
    """How many tokens at the end are the answer."""
    references: tuple[str, ...]
    """The answer's strings, for scoring generated text."""
    needles: tuple[tuple[int, int], ...] = ()
    """(first, end) token span of each needle, in the order the task placed them (the
    needle at the asked depth first)."""

    def mask(self) -> torch.Tensor:
        """[length] marking the predictions of the answer's tokens."""
        mask = torch.zeros(len(self.tokens) - 1)
        mask[len(mask) - self.answer:] = 1
        return mask


class Haystack:
    """Token ids the filler is cut from: ``text`` (held-out text; each cut starts at a
    random offset and wraps around) or ``noise`` (one sentence repeated from its start)."""

    def __init__(self, ids: Sequence[int], name: str, random_start: bool = True) -> None:
        if len(ids) == 0:
            raise HaystackError(f"the {name} haystack is empty: nothing to hide needles in")
        self.ids = np.asarray(ids, dtype=np.int64)
        self.name, self.random_start = name, random_start

    @classmethod
    def noise(cls, tokenizer: Tokenizer) -> Haystack:
        return cls(tokenizer.encode_part(NOISE), "noise", random_start=False)

    def take(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.ids)) if self.random_start else 0
        reps = -(-(start + n) // len(self.ids))
        return np.tile(self.ids, reps)[start:start + n].tolist()


class Encoder:
    """The run's tokenizer, refusing values it cannot spell back (they would not be
    recoverable from generated text)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode_part(text)

    def value(self, text: str) -> list[int]:
        ids = self.tokenizer.encode_part(text)
        if self.tokenizer.decode(ids).strip() != text:
            raise ValueError(f"the run's tokenizer cannot spell {text!r} (no byte fallback?)")
        return ids

    def decode(self, ids: list[int]) -> str:
        size = self.tokenizer.vocab_size  # the model's vocabulary is padded past it
        return self.tokenizer.decode([i for i in ids if i < size])


def occurrences(ids: Sequence[int], pattern: Sequence[int]) -> int:
    """How many times ``pattern`` occurs in ``ids`` (overlaps counted)."""
    ids, pattern = np.asarray(ids), np.asarray(pattern)
    if len(pattern) == 0 or len(pattern) > len(ids):
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(pattern))
    return int((windows == pattern).all(-1).sum())


def check_depth(depth: float) -> None:
    if not 0 <= depth <= 1:
        raise ValueError(f"a needle's depth is a fraction in [0, 1], got {depth}")


def assemble(length: int, rng: random.Random, haystack: Haystack, *, intro: list[int],
             needles: list[tuple[float, list[int]]], question: list[int], answer: list[int],
             references: Sequence[str], hidden: Sequence[list[int]]) -> Sample:
    """intro + filler with each (depth, ids) needle at depth · filler length + question +
    answer, ``length`` + 1 tokens in all. The filler is a cut of ``haystack`` in which no
    ``hidden`` sequence (the values the task hides) occurs."""
    for depth, _ in needles:
        check_depth(depth)
    fixed = len(intro) + sum(len(ids) for _, ids in needles) + len(question) + len(answer)
    room = length + 1 - fixed
    if room < 0:
        raise PromptTooLongError(f"the prompt needs {fixed - 1} tokens, more than {length}")
    for _ in range(RETRIES):
        filler = haystack.take(rng, room)
        if not any(occurrences(filler, h) for h in hidden):
            break
    else:
        raise HaystackError(f"every cut of the {haystack.name} haystack tried contains a "
                            "value the task hides; use another haystack")
    cuts = [round(depth * room) for depth, _ in needles]
    # By place, then depth, then given order: ties keep the tasks' depth order.
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], needles[i][0], i))
    ids, spans, done = list(intro), [(0, 0)] * len(needles), 0
    for i in order:
        ids += filler[done:cuts[i]]
        spans[i] = (len(ids), len(ids) + len(needles[i][1]))
        ids += needles[i][1]
        done = cuts[i]
    ids += filler[done:] + question + answer
    return Sample(ids, len(answer), tuple(references), tuple(spans))
