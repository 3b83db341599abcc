"""The CoPE paper's tasks: each generator's format and statistics, answers checked by an
independent reading of the text, outside data in the same format, the loss mask from
shards through the loader into the loss, and task evaluation end to end."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from cope_megatron.config import TaskConfig, load_config
from cope_megatron.data.corpus import PrepError
from cope_megatron.data.format import read_manifest
from cope_megatron.data.loader import ResumableLoader
from cope_megatron.data.prep.tasks import TASKS, prepare_task, sample_arrays
from cope_megatron.data.source import ordered_samples, split_spec
from cope_megatron.pe import get_pe

FLIPFLOP, COPY, COUNTING = TASKS["flipflop"], TASKS["selective_copy"], TASKS["counting"]


def last_write_bits(seq: str) -> list[tuple[int, str]]:
    """(index of the bit after each r, the bit of the latest w before it), read directly."""
    out, memory = [], None
    for k in range(0, len(seq), 2):
        if seq[k] == "w":
            memory = seq[k + 1]
        elif seq[k] == "r":
            out.append((k + 1, memory))
    return out


@pytest.mark.parametrize("p", [0.8, 0.98, 0.1])
def test_flipflop_follows_ffl_p(p):
    rng = random.Random(0)
    ops = Counter()
    for _ in range(60):
        seq = FLIPFLOP.generate(rng, p_ignore=p)
        assert len(seq) == 512 and seq[0] == "w" and seq[-2] == "r"
        assert set(seq[0::2]) <= set("wri") and set(seq[1::2]) <= set("01")
        for index, bit in last_write_bits(seq):
            assert seq[index] == bit
        ops.update(seq[2:-2:2])  # the slots FFL(p) draws
    n = sum(ops.values())
    assert ops["i"] / n == pytest.approx(p, abs=0.015)
    assert ops["w"] / n == pytest.approx((1 - p) / 2, abs=0.015)
    assert ops["r"] / n == pytest.approx((1 - p) / 2, abs=0.015)


def test_flipflop_mask_marks_exactly_the_bits_after_r():
    seq = FLIPFLOP.generate(random.Random(1), p_ignore=0.8)
    tokens, mask = sample_arrays(FLIPFLOP, seq, 512, np.dtype(np.uint8))
    assert tokens.shape == (513,) and mask.shape == (512,)
    # Prediction p predicts token p + 1 = character p of the sequence (after <bos>).
    assert np.flatnonzero(mask).tolist() == [i for i, _ in last_write_bits(seq)]
    vocab = FLIPFLOP.vocabulary
    assert "".join(vocab[t] for t in tokens[1:]) == seq


@pytest.mark.parametrize("split, blanks, seq_len", [("train", 256, 768), ("ood_dense", 128, 640),
                                                    ("ood_sparse", 512, 1024)])
def test_selective_copy_blanks_and_answers(split, blanks, seq_len):
    spec = COPY.splits()[split]
    assert spec.seq_len == seq_len
    rng = random.Random(2)
    for _ in range(5):
        example = COPY.generate(rng, **spec.params)
        source, target = example.split("|")
        assert source.count("_") == blanks and len(source) == 256 + blanks
        assert target == source.replace("_", "") and len(target) == 256
        tokens, mask = sample_arrays(COPY, example, seq_len, np.dtype(np.uint8))
        assert tokens.shape == (seq_len + 1,) and int(mask.sum()) == 256
        assert mask[-256:].all() and not mask[:-256].any()  # the copied tokens, no padding


def run_program(context: str) -> dict[str, int]:
    """An interpreter for counting programs, written apart from the generator."""
    values = {}
    for statement in re.findall(r"(\w) = 0 ;|(\w) \+\+;|pass;", context):
        set_var, inc_var = statement
        if set_var:
            values[set_var] = 0
        elif inc_var:
            values[inc_var] += 1
    return values


@pytest.mark.parametrize("variables", [1, 3, 5])
def test_counting_answers_and_pass_weights(variables):
    fractions = {}
    for split, spec in COUNTING.splits(variables=variables).items():
        rng = random.Random(3)
        kinds = Counter()
        for _ in range(40):
            example = COUNTING.generate(rng, **spec.params)
            statements = re.findall(r"\w = 0 ;|\w \+\+;|pass;", example["context"])
            assert 3 <= len(statements) <= 512
            assert " ".join(statements) == example["context"]
            values = run_program(example["context"])
            assert set(values) <= set("abcde"[:variables])
            assert max(values.values()) <= 10
            var = example["question"].split()[1]
            assert example["question"] == f"print {var}" and example["answer"] == str(values[var])
            kinds.update("pass" if s == "pass;" else "other" for s in statements)
            tokens, mask = sample_arrays(COUNTING, example, 512, np.dtype(np.uint8))
            answer_at = np.flatnonzero(mask)
            assert len(answer_at) == 1
            assert COUNTING.vocabulary[tokens[answer_at[0] + 1]] == example["answer"]
            assert not tokens[answer_at[0] + 2:].any()  # padding after the answer
        fractions[split] = kinds["pass"] / sum(kinds.values())
    assert fractions["ood_longer"] > fractions["train"] > fractions["ood_shorter"]
    # Weights 50 : 1 : 7 give passes 50/58 of the draws; an increment that cannot happen
    # (capped at 10, or nothing set) is drawn again, which can only raise the share.
    assert 50 / 58 - 0.03 < fractions["train"] < 50 / 51 + 0.01


def test_prepared_task_feeds_masks_through_the_loader(tmp_path):
    out = tmp_path / "ff"
    manifest = prepare_task(TaskConfig(name="flipflop", train_samples=24, test_samples=6),
                            out, progress=False)
    assert manifest["loss_mask"] and manifest["vocab_size"] == len(FLIPFLOP.vocabulary)
    assert set(manifest["splits"]) == {"train", "test", "ood_sparse", "ood_dense"}
    spec = split_spec(out, manifest, "train", micro_batch_size=4)
    batch = next(ResumableLoader(spec))
    assert batch["tokens"].shape == (4, 513) and batch["loss_mask"].shape == (4, 512)
    for tokens, mask in zip(batch["tokens"], batch["loss_mask"]):
        seq = "".join(FLIPFLOP.vocabulary[t] for t in tokens[1:])
        assert torch.nonzero(mask).flatten().tolist() == [i for i, _ in last_write_bits(seq)]
    # Same settings reuse the directory; other settings are refused, naming the key.
    assert prepare_task(TaskConfig(name="flipflop", train_samples=24, test_samples=6), out,
                        progress=False) == manifest
    with pytest.raises(PrepError, match="data.shards"):
        prepare_task(TaskConfig(name="flipflop", train_samples=25, test_samples=6), out,
                     progress=False)


def test_outside_data_in_the_documented_format_is_encoded(tmp_path):
    rng = random.Random(4)
    lines = [FLIPFLOP.generate(rng, p_ignore=0.98) for _ in range(5)]
    (tmp_path / "ff.txt").write_text("\n".join(lines) + "\n")
    records = [COUNTING.generate(rng, variables=1, w_pass=50) for _ in range(3)]
    (tmp_path / "count.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare_task(TaskConfig(name="flipflop", train_samples=4, test_samples=2,
                                       files={"test": str(tmp_path / "ff.txt")}),
                            tmp_path / "ff", progress=False)
    spec = split_spec(tmp_path / "ff", manifest, "test")
    decoded = ["".join(FLIPFLOP.vocabulary[t] for t in tokens[1:])
               for tokens, _ in ordered_samples(spec)]
    assert decoded == lines
    counted = prepare_task(TaskConfig(name="counting", train_samples=4, test_samples=2,
                                      files={"ood_longer": str(tmp_path / "count.jsonl")}),
                           tmp_path / "count", progress=False)
    assert counted["splits"]["ood_longer"]["samples"] == 3
    (tmp_path / "bad.txt").write_text(lines[0] + "\n" + "w0x1r0\n")
    with pytest.raises(PrepError, match=r"bad.txt, example 2: .*flip-flop"):
        prepare_task(TaskConfig(name="flipflop", train_samples=4, test_samples=2,
                                files={"test": str(tmp_path / "bad.txt")}),
                     tmp_path / "bad", progress=False)
    with pytest.raises(PrepError, match="task.files"):
        prepare_task(TaskConfig(name="flipflop", files={"valid": str(tmp_path / "ff.txt")}),
                     tmp_path / "x", progress=False)


def test_masked_positions_change_nothing(dist_cleanup):
    """A label the mask drops changes neither the loss nor a gradient; one it keeps does."""
    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.model.gpt import build_gpt, loss_sum

    cfg = load_config(["model.num_layers=1", "model.hidden_size=32", "model.seq_length=16",
                       "model.pe=cope"])
    init_distributed(1)
    seed_everything(0)
    model = build_gpt(cfg, get_pe(cfg.model.pe), 16)
    tokens = torch.randint(0, 16, (2, 17))
    mask = torch.ones(2, 16)
    mask[:, -1] = 0

    def loss_and_grads(t, m):
        model.zero_grad()
        loss = loss_sum(model, t, m)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % 16  # only a label: the last prediction's
    base, grads = loss_and_grads(tokens, mask)
    same, same_grads = loss_and_grads(changed, mask)
    assert torch.equal(base, same) and all(torch.equal(a, b) for a, b in zip(grads, same_grads))
    kept, _ = loss_and_grads(changed, torch.ones(2, 16))
    assert not torch.isclose(kept, loss_and_grads(tokens, torch.ones(2, 16))[0])


def test_task_run_trains_on_answers_and_reports_error_per_split(tmp_path, dist_cleanup):
    """Selective copy with learned positions: the OOD sparse split (1024 tokens) is beyond
    the 768 it was trained on, so it is not applicable; the others get error %."""
    from cope_megatron.cli import prep
    from cope_megatron.train import run_train

    cfg = load_config([
        "configs/tasks/selective_copy.yaml", "model.pe=learned", "model.hidden_size=32",
        "model.num_layers=1", "task.train_samples=16", "task.test_samples=3",
        f"data.shards={tmp_path / 'copy'}", f"run.dir={tmp_path / 'run'}", "train.steps=2",
        "train.micro_batch_size=2", "train.grad_accum=2", "logging.wandb=disabled",
        "logging.progress=false", "eval.batch_size=2"])
    prep(cfg)
    result, report = run_train(cfg)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert report["task"] == "selective_copy"
    splits = report["splits"]
    assert splits["ood_sparse"]["status"] == "not applicable"
    for split in ("test", "ood_dense"):
        assert splits[split]["answers"] == 3 * 256 and splits[split]["sequences"] == 3
        assert 0 <= splits[split]["error_pct"] <= 100
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["splits"] == json.loads(
        json.dumps(splits))
    assert read_manifest(tmp_path / "copy")["splits"]["train"]["seq_len"] == 768
