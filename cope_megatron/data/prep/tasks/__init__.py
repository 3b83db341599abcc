"""The CoPE paper's synthetic tasks, and RULER's retrieval tasks made trainable
(``retrieval``), as ordinary shard data sets with a loss mask.

``cope-megatron prep`` with ``task.name`` set generates (or, from ``task.files``, encodes)
every split of the task into ``data.shards``: one sample per example, padded, with a loss
mask marking the answer predictions, and a manifest whose ``task`` entry tells evaluation
to report error % per test split. The vocabulary is fixed per task (``vocab.json``), no
SentencePiece. A task is one module with a ``Task`` subclass and one line below.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import TaskConfig
from cope_megatron.data.corpus import PrepError
from cope_megatron.data.format import file_sha256, has_manifest, read_manifest, write_manifest
from cope_megatron.data.prep.prep import check_fingerprint
from cope_megatron.data.prep.shards import SplitWriter, token_dtype
from cope_megatron.data.prep.tasks.base import Example, Task, TaskFormatError
from cope_megatron.data.prep.tasks.counting import Counting
from cope_megatron.data.prep.tasks.flipflop import FlipFlop
from cope_megatron.data.prep.tasks.retrieval import NiahMultikey, NiahSingle, VariableTracking
from cope_megatron.data.prep.tasks.selective_copy import SelectiveCopy

TASKS: dict[str, Task] = {t.name: t for t in (FlipFlop(), SelectiveCopy(), Counting(),
                                              NiahSingle(), NiahMultikey(), VariableTracking())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise PrepError(f"task.name: unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def sample_arrays(task: Task, example: Example, seq_len: int, dtype: np.dtype
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [seq_len + 1], loss mask [seq_len]) of one example: padded after its end;
    prediction p (of token p + 1) counts when token p + 1 is an answer."""
    tokens, answers = task.encode(example)
    if len(tokens) > seq_len + 1:
        raise TaskFormatError(f"a {task.name} example of {len(tokens)} tokens does not fit "
                              f"a sample of {seq_len + 1}")
    pad = seq_len + 1 - len(tokens)
    ids = np.array(task.ids(tokens) + [0] * pad, dtype=dtype)
    return ids, np.array(answers[1:] + [False] * pad, dtype=np.uint8)


def read_examples(path: str | Path) -> Iterator[Example]:
    """Examples of an outside file: JSONL records, or one text example per line."""
    path = Path(path)
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line) if path.suffix == ".jsonl" else line.strip()


def _examples(task: Task, cfg: TaskConfig, split: str, params: dict) -> Iterator[Example]:
    if split in cfg.files:
        yield from read_examples(cfg.files[split])
        return
    rng = random.Random(f"{cfg.seed}:{task.name}:{split}")
    for _ in range(cfg.train_samples if split == "train" else cfg.test_samples):
        yield task.generate(rng, **params)


def prepare_task(cfg: TaskConfig, out: str | Path, progress: bool = True,
                 force: bool = False) -> dict:
    """Write every split of ``cfg.name`` into ``out``; returns the manifest (also written,
    last). A directory prepared with other task settings, or a non-empty one prep did not
    write (unless ``force``), is refused; an interrupted prep keeps its finished shards
    (generation is deterministic)."""
    task = get_task(cfg.name)
    splits = task.splits(variables=cfg.variables)
    unknown = set(cfg.files) - set(splits)
    if unknown:
        raise PrepError(f"task.files: {sorted(unknown)} are not splits of {task.name}; its "
                        f"splits are {sorted(splits)}")
    for split, path in cfg.files.items():
        if not Path(path).is_file():
            raise PrepError(f"task.files.{split}: {path} does not exist")
    settings = {"name": cfg.name, "seed": cfg.seed, "train_samples": cfg.train_samples,
                "test_samples": cfg.test_samples, "variables": cfg.variables,
                "files": {k: [str(v), Path(v).stat().st_size] for k, v in cfg.files.items()}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, settings, force=force)
    if has_manifest(out):
        return read_manifest(out)
    vocab_path = out / "vocab.json"
    write_text_atomic(vocab_path, json.dumps(list(task.vocabulary)))
    dtype = token_dtype(len(task.vocabulary))
    sha = file_sha256(vocab_path)
    entries = {}
    for split, spec in splits.items():
        meta = {"seq_len": spec.seq_len, "dtype": dtype.name, "tokenizer_sha256": sha,
                "loss_mask": True}
        writer = SplitWriter(out, split, meta, max_bytes=64 * 2**20)
        answers = 0
        examples = _examples(task, cfg, split, spec.params)
        for n, example in enumerate(tqdm(examples, desc=f"{task.name} {split}",
                                         disable=not progress, dynamic_ncols=True)):
            try:
                tokens, mask = sample_arrays(task, example, spec.seq_len, dtype)
            except TaskFormatError as e:
                where = cfg.files.get(split, "generated data")
                raise PrepError(f"{where}, example {n + 1}: {e}") from None
            writer.write(tokens, mask)
            answers += int(mask.sum())
        writer.close_shard()
        if not writer.samples:
            raise PrepError(f"task {task.name}: split {split} has no examples")
        entries[split] = {"samples": writer.samples, "seq_len": spec.seq_len,
                          "answers": answers, "shards": writer.shards}
    return write_manifest(out, {"task": settings, "seq_len": splits["train"].seq_len,
                "dtype": dtype.name, "tokenizer_sha256": sha, "tokenizer": vocab_path.name,
                "vocab_size": len(task.vocabulary), "pad_id": 0, "loss_mask": True,
                "splits": entries})
