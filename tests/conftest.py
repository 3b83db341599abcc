"""Shared fixtures: a small synthetic corpus prepared once per session, and a clean
process-group state around tests that build models in-process."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU only in its interpreter; read when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = ("the of and to in is was that for it with as his on be at by had not are but from "
         "or have an they which one you were her all she there would their we him been has when "
         "who will more no if out so said what up its about into than them can only other new "
         "some could time these two may then do first any my now such like our over man me even "
         "most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right "
         "used take three").split()


def write_corpus(root, docs: int = 12, words_per_doc: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(docs):
        lines = []
        for _ in range(words_per_doc // 12):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
        path = root / f"doc{d:03d}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def small_data(root, **changes):
    """The data section used by the session data set (``changes`` override fields)."""
    from cope_megatron.config import DataConfig

    fields = {"corpus": [str(root / "corpus")], "shards": str(root / "shards"),
              "cache_dir": str(root / "cache"), "vocab_size": 512, "val_fraction": 0.25,
              "shard_max_bytes": 20_000, "prep_workers": 2, **changes}
    return DataConfig(**fields)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared data set: (shard dir, manifest, corpus dir)."""
    from cope_megatron.data.prep.prep import prepare

    root = tmp_path_factory.mktemp("data")
    write_corpus(root / "corpus")
    manifest = prepare(small_data(root), seq_len=32, seed=7, progress=False)
    return root / "shards", manifest, root / "corpus"


@pytest.fixture
def dist_cleanup():
    yield
    from cope_megatron.distributed.parallel import destroy_distributed

    destroy_distributed()


def debug_overrides(shards, run_dir, **extra) -> list[str]:
    """Config sources for a debug-sized run on the session data set."""
    base = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
        "model.seq_length": 32, "data.shards": str(shards), "train.micro_batch_size": 4,
        "train.steps": 6, "train.warmup_steps": 1, "train.lr": 3e-3, "train.min_lr": 3e-3,
        "run.dir": str(run_dir), "logging.wandb": "disabled", "logging.progress": False,
        "eval.tokens": 256, "eval.batch_size": 2, "eval.length_multipliers": "[1, 2]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
