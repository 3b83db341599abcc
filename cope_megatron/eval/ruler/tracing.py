"""Variable tracking (RULER's multi-hop tracing): ``VAR A = 1234567``, then
``VAR B = VAR A``, ... hidden in order through the haystack; asked for every variable
that holds the value. The first assignment sits at the asked depth and the hops spread
evenly from there to the end of the haystack, so a deeper chain is also a shorter one.
"""

from __future__ import annotations

import random

from cope_megatron.eval.ruler.prompt import Encoder, Haystack, Sample, assemble
from cope_megatron.eval.ruler.words import distinct, number, variable

HOPS = 4
"""Assignments after the first (RULER's default): 5 variables in the chain."""

INTRO = "Memorize and track the chain of variable assignment hidden in the following text."
QUESTION = ("Question: Find all variables that are assigned the value", "in the text above. "
            "Answer: According to the chain of variable assignment in the text above, "
            f"{HOPS + 1} variables are assigned the value", ", they are:")


def tracking(rng: random.Random, enc: Encoder, length: int, depth: float,
             haystack: Haystack) -> Sample:
    names, value = distinct(variable, rng, HOPS + 1), number(rng)
    name_ids, value_ids = [enc.value(n) for n in names], enc.value(value)
    var, equals, stop = enc("VAR"), enc("="), enc(".")
    needles = []
    for i, name in enumerate(name_ids):
        source = value_ids if i == 0 else var + name_ids[i - 1]
        needles.append((depth + (1 - depth) * i / (HOPS + 1), var + name + equals + source + stop))
    first, middle, end = (enc(p) for p in QUESTION)
    return assemble(length, rng, haystack, intro=enc(INTRO), needles=needles,
                    question=first + value_ids + middle + value_ids + end,
                    answer=[i for ids in name_ids for i in ids], references=names,
                    hidden=[value_ids, *name_ids])
