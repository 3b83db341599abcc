"""Every workaround that lets Megatron-Core's GPT path run without CUDA, in one place.

Applied only when CUDA is absent, so the same model code runs on gloo (CPU) and nccl
(GPU). Measured facts behind each patch: ``shared/notes/megatron-deepspeed-cpu.md``.
"""

from __future__ import annotations

import contextlib

import deepspeed.ops
import torch
from megatron.core.models.common.embeddings import (
    rotary_pos_embedding,
    yarn_rotary_pos_embedding,
)
from megatron.core.tensor_parallel import random as mp_random


class CPURNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """Megatron's tensor-parallel RNG tracker backed by the CPU generator.

    Megatron forks named CUDA generator states for dropout inside TP regions; here each
    named state is a CPU generator state swapped in and out around the block.
    """

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Megatron's ``get_pos_emb_on_this_cp_rank`` (RoPE's table rows for this rank's head
    and tail chunks) without its pinned-memory, CUDA-only index tensor."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1,
                           *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def apply_cpu_compat() -> None:
    """Patch Megatron-Core's CUDA assumptions when CUDA is absent.

    - ``torch.cuda.current_device()`` is called for buffer/RoPE placement: answer "cpu".
    - the CUDA RNG tracker (``model_parallel_cuda_manual_seed``, attention dropout) is
      replaced by :class:`CPURNGStatesTracker`; activation recomputation's save and
      restore of the CUDA generator becomes a no-op (it restores the CPU one as well).
    - RoPE under context parallelism slices its table with a pinned CUDA index: the
      modules that imported it by name get :func:`pos_emb_on_this_cp_rank`.
    - DeepSpeed compiles a shared-memory all-reduce on the CPU for its inference path,
      which training never takes: about 30 s of g++ in every new environment (the build
      is keyed by its source path). It is marked unavailable, so nothing is built.
    - Subnormal floats are flushed to zero: CPUs take microcode assists on them, and
      attention's far keys pass through that range (FoX's forget-gated keys, CoPE's and
      every softmax's with sparse logits), which made FoX's op 6x slower at 4k tokens
      (bench/results_peers_op_cpu.txt). Their values are below fp32's resolution of any
      row's sum, so no result changes beyond rounding.
    """
    if torch.cuda.is_available():
        return
    torch.set_flush_denormal(True)
    torch.cuda.current_device = lambda: torch.device("cpu")
    for module in (rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    if not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        mp_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
