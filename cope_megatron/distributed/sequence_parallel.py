"""Sum sequence-parallel gradients across the tensor-parallel group.

Under Megatron sequence parallelism, LayerNorm parameters and row-parallel biases are
replicated on TP ranks but each rank sees only its slice of the sequence, so each holds a
partial gradient. Megatron's own DDP sums them in ``finalize_model_grads``; DeepSpeed
does not. A tensor hook fires before AccumulateGrad, hence before DeepSpeed's ZeRO hooks
reduce or partition the gradient, so it is correct for every ZeRO stage (an all-reduce
after backward is too late for ZeRO 2/3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def register_sequence_parallel_grad_hooks(model: torch.nn.Module) -> None:
    """Hook every parameter tagged ``sequence_parallel``."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            param.register_hook(all_reduce)
