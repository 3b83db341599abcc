"""RULER's aggregation tasks: common-words extraction (a numbered list of words in which
ten appear more often than the rest; name them) and frequent-words extraction (a text of
coded words; name the three most frequent). The list is the haystack: the task has no
depth; the list takes about as many entries as the length holds, haystack filler
before it making up the exact length.

RULER draws frequent words from a Zipf distribution and can tie; here the counts are
set (top three c+2, c+1, c, every other word fewer than c), so the answer is one list
in one order, as teacher-forced scoring needs. Common words are answered in order of
first appearance.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from cope_megatron.eval.ruler.prompt import Encoder, Haystack, PromptTooLongError, Sample, assemble
from cope_megatron.eval.ruler.words import WORDS, distinct

COMMON = 10
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often "
             "than others. Memorize the ones that appear most often.")
CWE_QUESTION = (f"Question: What are the {COMMON} most common words in the above list? "
                f"Answer: The top {COMMON} words that appear most often in the list are:")
TOP = 3
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
             f"Find the {TOP} most frequently appeared coded words.")
FWE_QUESTION = (f"Question: What are the {TOP} most frequently appeared words in the above "
                f"coded text? Answer: According to the coded text above, the {TOP} most "
                "frequently appeared words are:")


Build = Callable[[random.Random, int], tuple[list[list[int]], list[str]]]
"""(rng, entries wanted) -> (each entry's tokens, the answer's words)."""


def _sample(rng: random.Random, enc: Encoder, length: int, haystack: Haystack, intro: str,
            question: str, build: Build, least: int, what: str) -> Sample:
    """The most entries ``build`` makes that fit, as one block before the question; every
    try draws from the same seed, so the sample is one function of ``rng``."""
    intro_ids, question_ids = enc(intro), enc(question)
    room, seed = length + 1 - len(intro_ids) - len(question_ids), rng.random()
    n = max(room // 2, least)
    while n >= least:
        entries, answers = build(random.Random(seed), n)
        answer_ids = [enc.value(a) for a in answers]
        total = sum(len(e) for e in entries + answer_ids)
        if total <= room:
            return assemble(length, rng, haystack, intro=intro_ids,
                            needles=[(1.0, [i for e in entries for i in e])],
                            question=question_ids, answer=[i for a in answer_ids for i in a],
                            references=answers, hidden=answer_ids)
        n -= max(1, (total - room) * n // total)
    raise PromptTooLongError(f"{what} of {least} entries needs more than {length} tokens")


def common_words(rng: random.Random, enc: Encoder, length: int, depth: float | None,
                 haystack: Haystack) -> Sample:
    def build(r: random.Random, n: int) -> tuple[list[list[int]], list[str]]:
        words = r.sample(WORDS, len(WORDS))
        common, rare = words[:COMMON], words[COMMON:]
        each = max(2, n // (2 * COMMON))  # half the list: the common words
        # Rare words cycle: each appears fewer than ``each`` times at any n.
        listed = common * each + [rare[j % len(rare)] for j in range(n - COMMON * each)]
        r.shuffle(listed)
        first = sorted(common, key=listed.index)
        return [enc(f"{i + 1}. {w}") for i, w in enumerate(listed)], first

    return _sample(rng, enc, length, haystack, CWE_INTRO, CWE_QUESTION, build,
                   2 * COMMON, "a common-words list")


def _coded(r: random.Random) -> str:
    return "".join(r.choice(string.ascii_lowercase) for _ in range(5))


def frequent_words(rng: random.Random, enc: Encoder, length: int, depth: float | None,
                   haystack: Haystack) -> Sample:
    def build(r: random.Random, n: int) -> tuple[list[list[int]], list[str]]:
        c = max(2, n // 8)
        rest, cap = max(0, n - 3 * c - 3), c - 1
        words = distinct(_coded, r, TOP + -(-rest // cap))
        listed = [w for w, k in zip(words, (c + 2, c + 1, c)) for _ in range(k)]
        for j in range(rest):
            listed.append(words[TOP + j // cap])
        r.shuffle(listed)
        return [enc(w) for w in listed], words[:TOP]

    return _sample(rng, enc, length, haystack, FWE_INTRO, FWE_QUESTION, build, 3 * 2 + 3,
                   "a coded text")
