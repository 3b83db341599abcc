"""RULER's retrieval tasks as trainable data: exact lengths per split (1× to 16×), the
answer read back from the needles independently of the generator, the needles' promises
(one per key, the chain in order), outside data refused when its answer does not follow,
and prep writing every split."""

from __future__ import annotations

import random
import re

import pytest

from cope_megatron.config import TaskConfig
from cope_megatron.data.prep.tasks import TASKS, prepare_task, sample_arrays
from cope_megatron.data.prep.tasks.base import TaskFormatError
from cope_megatron.data.prep.tasks.retrieval import FILLER

NAMES = ("niah_single", "niah_multikey", "vt")


@pytest.mark.parametrize("name", NAMES)
def test_every_split_is_its_length_and_ends_in_the_answer(name):
    task = TASKS[name]
    splits = task.splits()
    assert {k: s.seq_len for k, s in splits.items()} == {
        "train": 128, "test": 128, "x2": 256, "x4": 512, "x8": 1024, "x16": 2048}
    for split in splits.values():
        rng = random.Random(0)
        for _ in range(20):
            example = task.generate(rng, **split.params)
            assert len(example) == split.seq_len + 1
            tokens, answers = task.encode(example)
            answer = example.rsplit("=", 1)[1]
            assert "".join(t for t, a in zip(tokens, answers) if a) == answer
            ids, mask = sample_arrays(task, example, split.seq_len, "uint8")
            assert mask.sum() == len(answer) and len(ids) == split.seq_len + 1


def statements(context: str) -> list[tuple[str, str]]:
    return re.findall(r"([A-Z]+)=([A-Z0-9]+)\.", context)


@pytest.mark.parametrize("name", ["niah_single", "niah_multikey"])
def test_the_queried_key_has_one_needle_and_its_value_is_the_answer(name):
    rng = random.Random(1)
    depths = []
    for _ in range(200):
        example = TASKS[name].generate(rng, length=512)
        context, question = example.rsplit("?", 1)
        key, answer = question.split("=")
        found = statements(context)
        assert len(found) == (1 if name == "niah_single" else 4)
        assert len({k for k, _ in found}) == len(found)  # distinct keys
        assert [v for k, v in found if k == key] == [answer]
        assert set(re.sub(r"[A-Z]+=[A-Z0-9]+\.", "", context)) <= set(FILLER)
        depths.append(context.index(f"{key}=") / len(context))
    assert min(depths) < 0.1 and max(depths) > 0.85  # depths spread over the window


def test_variable_tracking_answers_the_chain_in_order():
    rng = random.Random(2)
    for _ in range(100):
        example = TASKS["vt"].generate(rng, length=256)
        context, question = example.rsplit("?", 1)
        value, answer = question.split("=")
        chain = statements(context)
        assert chain[0][1] == value and len(chain) == 5
        assert all(chain[i][1] == chain[i - 1][0] for i in range(1, 5))
        assert answer == "".join(name for name, _ in chain)


@pytest.mark.parametrize("bad", ["abcKEY=1234.abc?KEY=9999", "abcKEY=1234.abc?KEZ=1234",
                                 "abcKEY=1234.abc", "abcX=1234.bcY=X.?1234=Y"])
def test_outside_examples_whose_answer_does_not_follow_are_refused(bad):
    task = TASKS["vt"] if "X=" in bad else TASKS["niah_single"]
    with pytest.raises(TaskFormatError):
        task.encode(bad)
    good = "abcKEY=1234.abc?KEY=1234" if task.name == "niah_single" else \
        "abcX=1234.bcY=X.?1234=XY"
    assert task.encode(good)[1][-2:] == [True, True]


def test_prep_writes_every_split(tmp_path):
    manifest = prepare_task(TaskConfig(name="niah_multikey", train_samples=8, test_samples=3),
                            tmp_path / "shards", progress=False)
    assert {k: (v["seq_len"], v["samples"], v["answers"]) for k, v in
            manifest["splits"].items()} == {
        "train": (128, 8, 32), "test": (128, 3, 12), "x2": (256, 3, 12),
        "x4": (512, 3, 12), "x8": (1024, 3, 12), "x16": (2048, 3, 12)}
