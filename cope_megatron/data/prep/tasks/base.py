"""What a synthetic task is: a fixed vocabulary, named splits, a generator and an encoder.

A task example is text (a string, or a mapping of strings for tasks whose outside data
comes as JSONL records); ``encode`` turns it into token ids and marks the answer tokens,
the only ones trained on and scored. Generated and outside examples go through the same
``encode``, so a file in a task's documented format can stand in for any split.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any

PAD, BOS = "<pad>", "<bos>"

Example = str | dict[str, str]


class TaskFormatError(ValueError):
    """An example that is not in its task's format; the message says what is wrong."""


@dataclass(frozen=True)
class Split:
    seq_len: int
    """Tokens per sample fed to the model (samples hold seq_len + 1: inputs and labels)."""
    params: dict[str, Any]
    """Keyword arguments of the task's ``generate`` for this split."""


class Task(ABC):
    """Subclasses set ``name`` and ``vocabulary`` (pad first) and implement ``splits``,
    ``generate`` and ``encode``. Sequence lengths are chosen so that seq_len divides by
    2 · CP (some tasks open with <bos> for that)."""

    name: str
    vocabulary: tuple[str, ...]

    @abstractmethod
    def splits(self, **options: Any) -> dict[str, Split]:
        """Split name -> its sample length and generator arguments."""

    @abstractmethod
    def generate(self, rng: random.Random, **params: Any) -> Example:
        """One example drawn with ``rng``."""

    @abstractmethod
    def encode(self, example: Example) -> tuple[list[str], list[bool]]:
        """(tokens, is-answer per token) of one example, padding aside; raises
        TaskFormatError."""

    @cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.vocabulary)}

    def ids(self, tokens: list[str]) -> list[int]:
        index = self._index
        unknown = sorted({t for t in tokens if t not in index})
        if unknown:
            raise TaskFormatError(f"tokens {unknown} are not in the {self.name} vocabulary "
                                  f"{list(self.vocabulary)}")
        return [index[t] for t in tokens]
