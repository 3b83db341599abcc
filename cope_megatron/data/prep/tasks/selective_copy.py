"""Selective Copy, the CoPE paper's dense variant (§5.2; Gu & Dao's task with more tokens).

Format: one example per line, ``<input>|<output>``: the input is 256 content tokens (the
letters a–o: 15 of them, which with the blank ``_`` make the paper's vocabulary of 16) mixed
with blanks at uniformly random places; the output is the content tokens in order, the
answers. The paper leaves the delimiter, the blank placement and the error unit unstated:
here ``|`` ends the input, blanks go anywhere, and the error counts copied tokens (its
0.004 % for CoPE OOD cannot be a per-sequence rate over 1K sequences).

Blanks: 256 for train and the in-distribution test (768 tokens), 128 for OOD dense (640),
512 for OOD sparse (1024).
"""

from __future__ import annotations

import random
import string

from cope_megatron.data.prep.tasks.base import PAD, Example, Split, Task, TaskFormatError

CONTENT = tuple(string.ascii_lowercase[:15])
BLANK, DELIMITER = "_", "|"
TOKENS = 256


class SelectiveCopy(Task):
    name = "selective_copy"
    vocabulary = (PAD, BLANK, DELIMITER, *CONTENT)

    def splits(self, **options) -> dict[str, Split]:
        def split(blanks: int) -> Split:
            return Split(2 * TOKENS + blanks, {"blanks": blanks})  # input, |, output − 1

        return {"train": split(256), "test": split(256), "ood_dense": split(128),
                "ood_sparse": split(512)}

    def generate(self, rng: random.Random, *, blanks: int) -> Example:
        content = [rng.choice(CONTENT) for _ in range(TOKENS)]
        slots = sorted(rng.sample(range(TOKENS + blanks), TOKENS))
        source = [BLANK] * (TOKENS + blanks)
        for slot, token in zip(slots, content):
            source[slot] = token
        return "".join(source) + DELIMITER + "".join(content)

    def encode(self, example: Example) -> tuple[list[str], list[bool]]:
        if not isinstance(example, str) or example.count(DELIMITER) != 1:
            raise TaskFormatError(f"a selective-copy example is input|output: {example!r:.40}")
        source, target = example.strip().split(DELIMITER)
        if [c for c in source if c != BLANK] != list(target):
            raise TaskFormatError("the output of a selective-copy example must be its "
                                  f"input's non-blank tokens in order: {example!r:.40}")
        tokens = [*source, DELIMITER, *target]
        return tokens, [False] * (len(source) + 1) + [True] * len(target)
