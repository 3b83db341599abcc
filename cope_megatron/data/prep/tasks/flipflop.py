"""Flip-Flop language modelling (Liu et al. 2023, arXiv 2306.00946), as in the CoPE paper.

Format: one sequence of 256 instruction–bit pairs per line, written as 512 characters over
{w, r, i, 0, 1} (``w0i1r0...``; whitespace ignored), the form of the public
``synthseq/flipflop`` strings. It starts with ``w`` and ends with ``r``. The bit after
``w`` or ``i`` is free; the bit after ``r`` must equal the bit of the latest ``w``: those
bits are the answers. Samples are <bos> + the 512 characters.

FFL(p): every pair but the first and the last draws ``i`` with probability p and ``w``, ``r``
with (1 − p)/2 each. Train and in-distribution test FFL(0.8); OOD sparse FFL(0.98) (the
paper's OOD column: long gaps between writes); OOD dense FFL(0.1).
"""

from __future__ import annotations

import random

from cope_megatron.data.prep.tasks.base import BOS, PAD, Example, Split, Task, TaskFormatError

PAIRS = 256


class FlipFlop(Task):
    name = "flipflop"
    vocabulary = (PAD, BOS, "w", "r", "i", "0", "1")

    def splits(self, **options) -> dict[str, Split]:
        length = 2 * PAIRS
        return {"train": Split(length, {"p_ignore": 0.8}),
                "test": Split(length, {"p_ignore": 0.8}),
                "ood_sparse": Split(length, {"p_ignore": 0.98}),
                "ood_dense": Split(length, {"p_ignore": 0.1})}

    def generate(self, rng: random.Random, *, p_ignore: float) -> Example:
        out, memory = [], "0"
        for k in range(PAIRS):
            if k == 0:
                op = "w"
            elif k == PAIRS - 1:
                op = "r"
            else:
                u = rng.random()
                op = "i" if u < p_ignore else ("w" if u < p_ignore + (1 - p_ignore) / 2 else "r")
            bit = memory if op == "r" else rng.choice("01")
            if op == "w":
                memory = bit
            out += [op, bit]
        return "".join(out)

    def encode(self, example: Example) -> tuple[list[str], list[bool]]:
        if not isinstance(example, str):
            raise TaskFormatError("a flip-flop example is a string of w/r/i and bits")
        chars = [c for c in example if not c.isspace()]
        ops, bits = chars[0::2], chars[1::2]
        if (len(ops) != len(bits) or set(ops) - set("wri") or set(bits) - set("01")
                or not ops or ops[0] != "w"):
            raise TaskFormatError(f"not a flip-flop sequence (instruction, bit pairs starting "
                                  f"with w): {example[:40]!r}...")
        answers = [False] + [k % 2 == 1 and chars[k - 1] == "r" for k in range(len(chars))]
        return [BOS, *chars], answers
