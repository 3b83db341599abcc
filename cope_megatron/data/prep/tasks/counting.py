"""Counting, the CoPE paper's §5.3 task, by the semantics of the authors' generator
(facebookresearch/RAM, projects/cope/scripts/count_data_gen.py).

Format: JSONL records ``{"context": ..., "question": "print x", "answer": "N"}``, the
authors' own files. A context is 3 to 512 statements over variables ``a`` … (1, 3 or 5 of
them): ``x = 0 ;`` (weight 1), ``x ++;`` (weight 7; only a variable already set, and never
past 10) and ``pass;`` (weight 50, the filler); the question prints a variable already
set and the answer is its value. Tokens are the whitespace-separated words, as the
authors' tokenizer splits them. A sample is <bos>, context, question, answer, cut from the
left to 513 tokens (the authors' context of 512) and padded after the answer.

OOD: the pass weight becomes 100 (longer gaps) or 10 (shorter).
"""

from __future__ import annotations

import random
import string

from cope_megatron.data.prep.tasks.base import BOS, PAD, Example, Split, Task, TaskFormatError

VARIABLES = tuple(string.ascii_lowercase[:5])
MAX_VALUE = 10
MAX_STATEMENTS = 512
CONTEXT = 512


class _Retry(Exception):
    """The draw cannot continue (increment past the cap, nothing set yet): draw again."""


class Counting(Task):
    name = "counting"
    vocabulary = (PAD, BOS, *VARIABLES, "=", ";", "++;", "pass;", "print",
                  *(str(v) for v in range(MAX_VALUE + 1)))

    def splits(self, *, variables: int = 1, **options) -> dict[str, Split]:
        def split(w_pass: int) -> Split:
            return Split(CONTEXT, {"variables": variables, "w_pass": w_pass})

        return {"train": split(50), "test": split(50), "ood_longer": split(100),
                "ood_shorter": split(10)}

    def generate(self, rng: random.Random, *, variables: int, w_pass: int) -> Example:
        names = VARIABLES[:variables]
        for _ in range(1000):
            try:
                return self._program(rng, names, w_pass)
            except _Retry:
                continue
        raise RuntimeError("counting: no program drawn in 1000 tries")

    def _program(self, rng: random.Random, names: tuple[str, ...], w_pass: int) -> dict:
        values: dict[str, int] = {}
        statements = []
        for _ in range(rng.randint(3, MAX_STATEMENTS)):
            statements.append(self._statement(rng, names, values, w_pass))
        if not values:
            raise _Retry
        var = rng.choice(sorted(values))
        return {"context": " ".join(statements), "question": f"print {var}",
                "answer": str(values[var])}

    def _statement(self, rng: random.Random, names: tuple[str, ...], values: dict[str, int],
                   w_pass: int) -> str:
        for _ in range(100):
            op = rng.choices(("set", "pass", "inc"), (1, w_pass, 7))[0]
            if op == "set":
                var = rng.choice(names)
                values[var] = 0
                return f"{var} = 0 ;"
            if op == "pass":
                return "pass;"
            if values:
                var = rng.choice(sorted(values))
                if values[var] < MAX_VALUE:
                    values[var] += 1
                    return f"{var} ++;"
        raise _Retry

    def encode(self, example: Example) -> tuple[list[str], list[bool]]:
        if not isinstance(example, dict) or {"context", "question", "answer"} - set(example):
            raise TaskFormatError("a counting example is a record with context, question "
                                  f"and answer: {str(example):.60}")
        words = [BOS, *example["context"].split(), *example["question"].split()]
        answer = example["answer"].split()
        if len(answer) != 1:
            raise TaskFormatError(f"a counting answer is one value, got {example['answer']!r}")
        tokens = (words + answer)[-(CONTEXT + 1):]
        return tokens, [False] * (len(tokens) - 1) + [True]
