"""The RULER-style generators keep their promises (deterministic, exact length, one needle
at the asked depth, the answer hidden once, unambiguous aggregation answers, clear errors),
greedy decoding in few forwards equals token-by-token decoding, and the scoring and
effective-length rules."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from cope_megatron.data.tokenizer import dataset_tokenizer
from cope_megatron.eval.ruler import aggregation, niah, tracing
from cope_megatron.eval.ruler.effective import effective_length, mean_over_tasks
from cope_megatron.eval.ruler.prompt import (
    Haystack,
    HaystackError,
    PromptTooLongError,
    assemble,
    occurrences,
)
from cope_megatron.eval.ruler.scoring import string_match
from cope_megatron.eval.ruler.tasks import TASKS, generate

LENGTH = 640  # holds every task's prompt with the session tokenizer (512 pieces)


@pytest.fixture(scope="module")
def tok(prepared):
    shards, manifest, _ = prepared
    return dataset_tokenizer(shards, manifest)


@pytest.fixture(scope="module", params=["text", "noise"])
def hay(request, tok, prepared):
    if request.param == "noise":
        return Haystack.noise(tok)
    _, _, corpus = prepared
    return Haystack(tok.encode((corpus / "doc000.txt").read_text()), "text")


def draw(task, tok, hay, depth=0.5, index=0, length=LENGTH, seed=0):
    return generate(task, seed=seed, tokenizer=tok, length=length, depth=depth, haystack=hay,
                    index=index)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_is_deterministic_of_exact_length_and_ends_in_its_answer(task, tok, hay):
    a, b = draw(task, tok, hay), draw(task, tok, hay)
    assert a == b  # the same seed, the same sample
    assert draw(task, tok, hay, index=1) != a and draw(task, tok, hay, seed=1) != a
    for length in (LENGTH, LENGTH + 37):
        s = draw(task, tok, hay, length=length)
        assert len(s.tokens) == length + 1
        assert s.mask().shape == (length,) and s.mask().sum() == s.answer
        answer = tok.decode(s.tokens[-s.answer:])
        assert re.sub(r"\s+", " ", answer).strip() == " ".join(s.references)


NEEDLE_TASKS = ["niah_single_number", "niah_single_word", "niah_single_uuid",
                "niah_multikey", "niah_multivalue", "niah_multiquery"]


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_the_asked_needle_sits_once_at_its_depth(task, tok, hay):
    kind = next((k for k in ("word", "uuid") if k in task), "number")
    intro = len(tok.encode(niah.INTRO.format(kind=kind)))
    ask = niah.ASK_ALL if task in ("niah_multivalue", "niah_multiquery") else niah.ASK_ONE
    opening = tok.encode(ask[0].format(kind=kind))
    gaps = []
    for depth in (0.0, 0.5, 1.0):
        s = draw(task, tok, hay, depth=depth)
        prompt = s.tokens[:-s.answer]
        first, end = s.needles[0]
        assert occurrences(prompt, s.tokens[first:end]) == 1  # the needle, once
        # The filler (the haystack without the needles) splits at the depth.
        question = max(i for i in range(len(prompt)) if prompt[i:i + len(opening)] == opening)
        needles = sum(e - b for b, e in s.needles)
        before = first - intro - sum(e - b for b, e in s.needles[1:] if e <= first)
        after = question - intro - needles - before
        gaps.append((before, after))
        assert before == round(depth * (before + after))
        # Every hidden value: once in the prompt, in a needle.
        for value in s.references:
            ids = tok.encode(value)
            assert occurrences(prompt, ids) == 1, value
            where = next(i for i in range(len(prompt)) if prompt[i:i + len(ids)] == ids)
            assert any(b <= where < e for b, e in s.needles)
    assert gaps[0][0] == 0 and gaps[-1][1] == 0


def test_multikey_hides_distractors_with_other_keys(tok, hay):
    s = draw("niah_multikey", tok, hay)
    needles = [tok.decode(s.tokens[b:e]) for b, e in s.needles]
    keys = [re.search(r"for (\S+) is", n).group(1) for n in needles]
    assert len(needles) == niah.MULTI and len(set(keys)) == niah.MULTI
    question = tok.decode(s.tokens[max(e for _, e in s.needles):-s.answer])
    asked = [k for k in keys if k in question]
    assert asked == keys[:1]  # only the needle at the asked depth is asked for
    assert s.references[0] in needles[0]


def test_variable_tracking_chains_in_order_through_the_haystack(tok, hay):
    s = draw("vt", tok, hay, depth=0.25)
    statements = [tok.decode(s.tokens[b:e]).replace(" ", "") for b, e in s.needles]
    assert [b for b, _ in s.needles] == sorted(b for b, _ in s.needles)
    names = s.references
    assert len(names) == tracing.HOPS + 1
    value = re.fullmatch(rf"VAR{names[0]}=(\d+)\.", statements[0]).group(1)
    for i in range(1, len(names)):
        assert statements[i] == f"VAR{names[i]}=VAR{names[i - 1]}."
    # Its needle and the question's two mentions (RULER's wording).
    assert occurrences(s.tokens[:-s.answer], tok.encode(value)) == 3


def test_aggregation_answers_are_the_strictly_most_frequent_words(tok, hay):
    s = draw("cwe", tok, hay, depth=None)
    listed = re.findall(r"\d+\. (\w+)", tok.decode(s.tokens[slice(*s.needles[0])]))
    counts = Counter(listed)
    common = set(s.references)
    assert len(common) == aggregation.COMMON
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)
    assert list(s.references) == sorted(common, key=listed.index)  # in order of appearance
    s = draw("fwe", tok, hay, depth=None)
    counts = Counter(tok.decode(s.tokens[slice(*s.needles[0])]).split())
    top = [counts[w] for w in s.references]
    rest = [c for w, c in counts.items() if w not in s.references]
    assert top == sorted(top, reverse=True) and len(set(top)) == 3 and top[-1] > max(rest)


def test_generators_refuse_what_they_cannot_promise(tok, hay):
    with pytest.raises(ValueError, match=r"depth is a fraction in \[0, 1\], got 1.5"):
        draw("niah_single_number", tok, hay, depth=1.5)
    with pytest.raises(ValueError, match="got -0.1"):
        draw("vt", tok, hay, depth=-0.1)
    for task in TASKS:
        with pytest.raises(PromptTooLongError, match="more than 64"):
            draw(task, tok, hay, length=64)
    with pytest.raises(HaystackError, match="empty"):
        Haystack([], "text")
    # A haystack of nothing but the value the task hides: no cut is free of it.
    value = tok.encode("violet-summit")
    with pytest.raises(HaystackError, match="contains a value"):
        assemble(400, random.Random(0), Haystack(value * 50, "words"), intro=[],
                 needles=[(0.5, value)], question=[], answer=value,
                 references=["violet-summit"], hidden=[value])


def test_string_match_is_whole_word_order_free_and_partial():
    assert string_match("the values are 1234567 and 7654321", ("7654321", "1234567")) == 1.0
    assert string_match("12345678", ("1234567",)) == 0.0  # no partial number
    assert string_match("ABCDE xyz", ("abcde", "QWERT")) == 0.5
    assert string_match("violet-summit", ("summit",)) == 0.0


def test_effective_length_is_the_longest_length_at_the_threshold():
    scores = {32: 0.8, 64: 0.7, 128: 0.5, 256: 0.69, 512: None}
    got = effective_length(scores, 32, threshold=0.85)
    assert got == {"length": 256, "threshold": pytest.approx(0.68)}  # longest, not first gap
    assert effective_length(scores, 32, 0.85, absolute=0.75)["length"] == 32
    assert effective_length(scores, 32, 0.85, absolute=0.9) == {
        "length": None, "threshold": 0.9, "reason": "below the threshold at every evaluated length"}
    missing = effective_length({32: None, 64: 0.5}, 32, 0.85)
    assert missing["status"] == "not applicable" and "absolute_threshold" in missing["reason"]
    zero = effective_length({32: 0.0, 64: 0.0}, 32, 0.85)
    assert zero["status"] == "not applicable" and "scores 0" in zero["reason"]


def test_the_average_over_tasks_is_missing_where_any_task_is():
    rows = {"a": {32: {"mean": {"greedy": 1.0}}, 64: {"mean": {"greedy": 0.5}}},
            "b": {32: {"status": "not applicable"}, 64: {"mean": {"greedy": 0.0}}}}
    assert mean_over_tasks(rows, "greedy") == {32: None, 64: 0.25}


def test_greedy_decoding_equals_token_by_token_generation(dist_cleanup):
    import torch

    from cope_megatron.eval.ruler.decode import greedy
    from tests.helpers import tiny_gpt

    model = tiny_gpt()
    tokens = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    answer = 5

    def step_by_step(row):
        ids = row[:-answer].clone()
        for _ in range(answer):
            logits = model(ids[None], torch.arange(len(ids))[None], None)
            ids = torch.cat([ids, logits[0, -1].argmax()[None]])
        return ids[-answer:]

    with torch.no_grad():
        want = torch.stack([step_by_step(row) for row in tokens])
        tokens[0, -answer:] = want[0]  # sample 0's gold answer is what the model generates
        tokens[1, -answer:] = want[1]
        tokens[1, -2] = (want[1, -2] + 1) % 100  # sample 1 goes wrong at its 4th token
        got, forced, forwards = greedy(model, tokens, answer)
    assert torch.equal(got, want)
    assert forced[0].all() and forced[1, :4].tolist() == [True, True, True, False]
    assert not forced[2].all()
    assert forwards <= answer + 1  # at most one more per token it gets wrong


@pytest.mark.parametrize("override, key", [
    ("eval.ruler.tasks=[niah_single_number,needle]", "eval.ruler.tasks: unknown tasks"),
    ("eval.ruler.depths=[0.5,1.5]", "eval.ruler.depths"),
    ("eval.ruler.scoring=[beam]", "eval.ruler.scoring"),
    ("eval.ruler.threshold=0", "eval.ruler.threshold"),
    ("eval.ruler.absolute_threshold=2", "eval.ruler.absolute_threshold"),
    ("eval.ruler.samples=0", "eval.ruler.samples"),
    ("eval.ruler.length_multipliers=[]", "eval.ruler.length_multipliers"),
    ("eval.last_k=4096", "eval.last_k"),
    ("eval.position_bins=0", "eval.position_bins"),
    ("task.name=flipflop eval.ruler.tasks=[vt]", "eval.ruler.tasks: a task run"),
    ("task.name=vt eval.position_loss=true", "eval.position_loss: a task run"),
])
def test_suite_settings_are_checked_at_start(override, key):
    from cope_megatron.config import ConfigError, load_config
    from cope_megatron.startup import check

    with pytest.raises(ConfigError, match=key):
        check(load_config(["model.seq_length=64", *override.split()]), 1, data=False)


def test_the_shipped_suite_runs_a_1_3b_model_under_cp_in_one_command():
    from pathlib import Path

    from cope_megatron.config import load_config
    from cope_megatron.startup import check

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config([str(configs / "model" / "1.3b.yaml"),
                       str(configs / "parallel" / "cp2_tp2_sp_zero2.yaml"),
                       str(configs / "eval" / "ruler.yaml")])
    check(cfg, 4, data=False)
    assert cfg.parallel.context == 2 and sorted(cfg.eval.ruler.tasks) == sorted(TASKS)
    assert cfg.eval.position_loss and max(cfg.eval.ruler.length_multipliers) == 16
