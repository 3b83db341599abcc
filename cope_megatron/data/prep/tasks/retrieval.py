"""RULER's retrieval and tracing tasks (Hsieh et al. 2024, arXiv 2404.06654) made trainable:
the needle-in-a-haystack and variable-tracking prompts of ``eval/ruler`` in a fixed
character vocabulary, trained at one length and tested at 1× to 16× it, the CPU-scale
experiment where PEs part (which keeps retrieving at 8× its training length?).

Format: one example per line, ``<context>?<query>=<answer>``, one character a token. The
haystack is lowercase letters a–p; a needle is ``KEY=VALUE.`` (keys three capitals, values
four digits), a hop of variable tracking ``NAME=VALUE.`` or ``NAME=NAME.`` (names two
capitals). Haystack letters never spell a needle, so the needles are the only structure.

- ``niah_single``: one needle at a uniform depth; the query is its key, the answer its value.
- ``niah_multikey``: four needles with distinct keys at uniform depths; the query names
  one of them.
- ``vt``: a value and a chain of four hops through the haystack in order; the query is the
  value, the answer every name in the chain, in order.

Splits: train and test at 128 tokens, ``x2`` … ``x16`` at 256 … 2048.
"""

from __future__ import annotations

import random
import string
from abc import abstractmethod

from cope_megatron.data.prep.tasks.base import PAD, Example, Split, Task, TaskFormatError

LENGTH = 128
FILLER = string.ascii_lowercase[:16]
SYMBOLS = "=.?"


def _word(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _distinct(rng: random.Random, alphabet: str, n: int, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        w = _word(rng, alphabet, n)
        if w not in out:
            out.append(w)
    return out


class Retrieval(Task):
    """Subclasses draw (needles in context order or not, query, answer) in ``parts``."""

    vocabulary = (PAD, *FILLER, *string.ascii_uppercase, *string.digits, *SYMBOLS)
    ordered = False
    """Whether the needles keep their order in the context (a chain)."""

    def splits(self, **options) -> dict[str, Split]:
        out = {"train": Split(LENGTH, {"length": LENGTH}),
               "test": Split(LENGTH, {"length": LENGTH})}
        for m in (2, 4, 8, 16):
            out[f"x{m}"] = Split(m * LENGTH, {"length": m * LENGTH})
        return out

    @abstractmethod
    def parts(self, rng: random.Random) -> tuple[list[str], str, str]:
        """(needles, query, answer) of one example."""

    def generate(self, rng: random.Random, *, length: int) -> Example:
        needles, query, answer = self.parts(rng)
        tail = f"?{query}={answer}"
        room = length + 1 - len(tail) - sum(map(len, needles))
        cuts = [rng.randrange(room + 1) for _ in needles]
        if self.ordered:
            cuts.sort()
        filler = _word(rng, FILLER, room)
        order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
        text, done = "", 0
        for i in order:
            text += filler[done:cuts[i]] + needles[i]
            done = cuts[i]
        return text + filler[done:] + tail

    def encode(self, example: Example) -> tuple[list[str], list[bool]]:
        if not isinstance(example, str) or "?" not in example:
            raise TaskFormatError(f"a {self.name} example is <context>?<query>=<answer>: "
                                  f"{example!r:.40}")
        context, question = example.strip().rsplit("?", 1)
        query, _, answer = question.partition("=")
        if not answer or self.answer_of(context, query) != answer:
            raise TaskFormatError(f"the answer of a {self.name} example must follow from its "
                                  f"needles: {example[-40:]!r}")
        tokens = list(example.strip())
        return tokens, [False] * (len(tokens) - len(answer)) + [True] * len(answer)

    def answer_of(self, context: str, query: str) -> str | None:
        """The answer the needles in ``context`` give ``query``, read independently."""
        found = {k: v for k, v in (n.split("=") for n in _needles(context))}
        return found.get(query)


def _needles(context: str) -> list[str]:
    """Every ``X=Y`` statement of the context (filler is lowercase: they stand out)."""
    out, current = [], ""
    for c in context:
        if c in FILLER:
            current = ""
        elif c == ".":
            if "=" in current:
                out.append(current)
            current = ""
        else:
            current += c
    return out


class NiahSingle(Retrieval):
    name = "niah_single"

    def parts(self, rng: random.Random) -> tuple[list[str], str, str]:
        key, value = _word(rng, string.ascii_uppercase, 3), _word(rng, string.digits, 4)
        return [f"{key}={value}."], key, value


class NiahMultikey(Retrieval):
    name = "niah_multikey"

    def parts(self, rng: random.Random) -> tuple[list[str], str, str]:
        keys = _distinct(rng, string.ascii_uppercase, 3, 4)
        values = [_word(rng, string.digits, 4) for _ in keys]
        asked = rng.randrange(len(keys))
        return [f"{k}={v}." for k, v in zip(keys, values)], keys[asked], values[asked]


class VariableTracking(Retrieval):
    name = "vt"
    ordered = True
    HOPS = 4

    def parts(self, rng: random.Random) -> tuple[list[str], str, str]:
        names = _distinct(rng, string.ascii_uppercase, 2, self.HOPS + 1)
        value = _word(rng, string.digits, 4)
        sources = [value, *names[:-1]]
        return [f"{n}={s}." for n, s in zip(names, sources)], value, "".join(names)

    def answer_of(self, context: str, query: str) -> str | None:
        holders, assignments = [], [n.split("=") for n in _needles(context)]
        for name, source in assignments:
            if source == query or source in holders:
                holders.append(name)
        return "".join(holders) or None
