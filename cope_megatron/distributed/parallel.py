"""Process groups and seeding: torch.distributed + Megatron-Core's parallel_state."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from cope_megatron.distributed.cpu_compat import apply_cpu_compat

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    dp_rank: int
    """Model replica index: CP ranks of one replica share it (and their samples)."""
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_device() -> torch.device:
    """Where this rank's tensors (and those it all-reduces) live: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(tensor: int, context: int = 1) -> DistEnv:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and Megatron's model-parallel groups.

    Works plain (one process) and under torchrun/SLURM-style env vars.
    """
    apply_cpu_compat()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun, SLURM via torchrun, deepspeed launcher
            dist.init_process_group(backend)
        else:  # a plain process: a world of one (DeepSpeed insists on LOCAL_RANK)
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor, context_parallel_size=context
        )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=collective_device(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def replica_group() -> dist.ProcessGroup:
    """Ranks holding copies of the same parameters: data × context parallel. Gradients,
    ZeRO states and per-token loss averages reduce over it."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def mean_over_replicas(value: torch.Tensor) -> float:
    """The mean of a per-rank scalar (a loss over this rank's tokens) over DP × CP."""
    value = value.detach().clone()
    dist.all_reduce(value, group=replica_group())
    return value.item() / dist.get_world_size(replica_group())


def sum_over_data_parallel(value: float) -> float:
    """Σ of a per-replica value (e.g. a count of samples' tokens) over data-parallel ranks:
    the CP ranks of a replica hold the same samples, so they count once."""
    total = torch.tensor(float(value), dtype=torch.float64, device=collective_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total.item()


def any_rank(*flags: bool) -> list[bool]:
    """Each flag, true when it is true on any rank (one all-reduce), so that all ranks
    take the same branch (save, stop, skip)."""
    values = torch.tensor([float(f) for f in flags], device=collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def decided_by_main(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 alone (it reads or writes the run directory), its result
    on every rank; an error it raises is raised on every rank."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(decide(), None)]
        except Exception as e:
            box = [(None, e)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def seed_everything(seed: int) -> None:
    """Same seed on every rank: with ``use_cpu_initialization`` weights are drawn whole and
    sliced, so the full model is identical for every TP layout. Megatron's tracker then
    gives TP regions their own (per-rank) dropout stream."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
