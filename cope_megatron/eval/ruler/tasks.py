"""The suite's tasks by name, and the one way a sample is drawn: from (seed, task, length,
depth, index) alone, so every rank, every PE and every run of a comparison reads the
same prompts."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from cope_megatron.config import ConfigError
from cope_megatron.data.tokenizer import Tokenizer
from cope_megatron.eval.ruler import aggregation, niah, tracing
from cope_megatron.eval.ruler.prompt import Encoder, Haystack, Sample, check_depth


@dataclass(frozen=True)
class RulerTask:
    name: str
    make: Callable[[random.Random, Encoder, int, float | None, Haystack], Sample]
    uses_depth: bool = True
    """False: the task has no needle to place (aggregation); scored once per length."""


TASKS = {t.name: t for t in (
    RulerTask("niah_single_number", niah.single("number")),
    RulerTask("niah_single_word", niah.single("word")),
    RulerTask("niah_single_uuid", niah.single("uuid")),
    RulerTask("niah_multikey", niah.multikey),
    RulerTask("niah_multivalue", niah.multivalue),
    RulerTask("niah_multiquery", niah.multiquery),
    RulerTask("vt", tracing.tracking),
    RulerTask("cwe", aggregation.common_words, uses_depth=False),
    RulerTask("fwe", aggregation.frequent_words, uses_depth=False),
)}


def check_tasks(names: list[str]) -> None:
    """ConfigError unless every name is a task of the suite."""
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ConfigError(f"eval.ruler.tasks: unknown tasks {unknown}; choose from "
                          f"{sorted(TASKS)}")


def generate(task: str, *, seed: int, tokenizer: Tokenizer, length: int,
             depth: float | None, haystack: Haystack, index: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at ``length`` tokens (+ 1 predicted) and ``depth``
    (None for a task without one). Raises PromptTooLongError when the length cannot hold
    the prompt and its answer, ValueError for a depth outside [0, 1]."""
    spec = TASKS[task]
    if spec.uses_depth:
        check_depth(depth)
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
    return spec.make(rng, Encoder(tokenizer), length, depth, haystack)
