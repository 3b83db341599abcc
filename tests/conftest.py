"""Shared fixtures: a small synthetic corpus prepared once per session, and a clean
process-group state around tests that build models in-process."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import small_data, start_fork_server, write_corpus

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU only in its interpreter; read when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # After the environment above, which its processes inherit. Not on a GPU machine: there
    # only tests/test_gpu.py runs, whose few processes (the two-GPU test's ranks, data
    # loader workers) start the server when they need it, and preloading it in every
    # pytest process (seconds of CPU each) would compete with the kernels' compiles.
    start_fork_server()


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
