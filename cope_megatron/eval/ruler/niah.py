"""Needle in a haystack, RULER's four kinds (Hsieh et al. 2024, arXiv 2404.06654, §3):
single (one key, one value), multi-key (the asked key among distractor needles with
other keys), multi-value (one key, several values: all asked) and multi-query (several
keys, each asked). Keys are adjective-noun words; values numbers, words or UUID-like
strings. The needle of the asked key (multi-value: its first value) sits at the asked
depth, the others at depths drawn from the sample's seed.
"""

from __future__ import annotations

import random

from cope_megatron.eval.ruler.prompt import Encoder, Haystack, Sample, assemble
from cope_megatron.eval.ruler.words import VALUES, distinct, word

INTRO = ("Some special magic {kind}s are hidden within the following text. Make sure to "
         "memorize it. I will quiz you about the {kind}s afterwards.")
NEEDLE = ("One of the special magic {kind}s for", "is:", ".")
ASK_ONE = ("What is the special magic {kind} for", "mentioned in the provided text? The "
           "special magic {kind} for", "mentioned in the provided text is")
ASK_ALL = ("What are all the special magic {kind}s for", "mentioned in the provided text? "
           "The special magic {kind}s for", "mentioned in the provided text are")

MULTI = 4
"""Needles of multi-key (1 asked + 3 distractors), values of multi-value, keys of
multi-query (RULER's defaults)."""


def _needle(enc: Encoder, kind: str, key: list[int], value: list[int]) -> list[int]:
    before, middle, end = (enc(p.format(kind=kind)) for p in NEEDLE)
    return before + key + middle + value + end


def _question(enc: Encoder, kind: str, keys: list[list[int]], ask: tuple[str, ...]
              ) -> list[int]:
    comma = enc(",")
    named: list[int] = []
    for i, key in enumerate(keys):
        named += (comma if i else []) + key
    first, middle, end = (enc(p.format(kind=kind)) for p in ask)
    return first + named + middle + named + end


def _prompt(rng: random.Random, enc: Encoder, length: int, haystack: Haystack, kind: str,
            needles: list[tuple[float, list[int], list[int]]], asked: list[list[int]],
            answer: list[str], ask: tuple[str, ...]) -> Sample:
    """needles: (depth, key ids, value ids); the answer: ``answer`` values in order."""
    answer_ids = [i for value in answer for i in enc.value(value)]
    return assemble(length, rng, haystack, intro=enc(INTRO.format(kind=kind)),
                    needles=[(d, _needle(enc, kind, k, v)) for d, k, v in needles],
                    question=_question(enc, kind, asked, ask), answer=answer_ids,
                    references=answer, hidden=[v for _, _, v in needles])


def single(kind: str):
    """One needle of a ``kind`` value (number, word, uuid) at the depth."""
    def make(rng: random.Random, enc: Encoder, length: int, depth: float,
             haystack: Haystack) -> Sample:
        key, value = word(rng), VALUES[kind](rng)
        while value == key:  # a word value must not be its own key
            value = VALUES[kind](rng)
        key_ids = enc.value(key)
        return _prompt(rng, enc, length, haystack, kind, [(depth, key_ids, enc.value(value))],
                       [key_ids], [value], ASK_ONE)
    return make


def multikey(rng: random.Random, enc: Encoder, length: int, depth: float,
             haystack: Haystack) -> Sample:
    keys, values = distinct(word, rng, MULTI), distinct(VALUES["number"], rng, MULTI)
    key_ids = [enc.value(k) for k in keys]
    depths = [depth] + [rng.random() for _ in range(MULTI - 1)]
    needles = [(d, k, enc.value(v)) for d, k, v in zip(depths, key_ids, values)]
    return _prompt(rng, enc, length, haystack, "number", needles, key_ids[:1], values[:1],
                   ASK_ONE)


def multivalue(rng: random.Random, enc: Encoder, length: int, depth: float,
               haystack: Haystack) -> Sample:
    key, values = word(rng), distinct(VALUES["number"], rng, MULTI)
    key_ids = enc.value(key)
    depths = [depth] + [rng.random() for _ in range(MULTI - 1)]
    needles = [(d, key_ids, enc.value(v)) for d, v in zip(depths, values)]
    # The answer lists the values as they appear (the order ``assemble`` places them in).
    answer = [v for _, v in sorted(zip(depths, values), key=lambda dv: dv[0])]
    return _prompt(rng, enc, length, haystack, "number", needles, [key_ids], answer, ASK_ALL)


def multiquery(rng: random.Random, enc: Encoder, length: int, depth: float,
               haystack: Haystack) -> Sample:
    keys, values = distinct(word, rng, MULTI), distinct(VALUES["number"], rng, MULTI)
    key_ids = [enc.value(k) for k in keys]
    depths = [depth] + [rng.random() for _ in range(MULTI - 1)]
    needles = [(d, k, enc.value(v)) for d, k, v in zip(depths, key_ids, values)]
    return _prompt(rng, enc, length, haystack, "number", needles, key_ids, values, ASK_ALL)
