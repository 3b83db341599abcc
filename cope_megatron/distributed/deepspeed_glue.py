"""DeepSpeed glue: the ``mpu`` adapter over Megatron's parallel_state and the engine config
generated from our typed config (never hand-written beside it)."""

from __future__ import annotations

from functools import partial

from deepspeed.runtime.utils import clip_grad_norm_
from megatron.core import parallel_state as ps

from cope_megatron.config import Config, merge_dicts


class MegatronMPU:
    """The model-parallel unit DeepSpeed expects, answered by Megatron's process groups.

    DeepSpeed's ZeRO, grad-norm and checkpoint code call the legacy ``*_model_parallel_*``
    names, which parallel_state lacks; they mean the tensor-parallel group here. (No
    ``initialize_sequence_parallel``: DeepSpeed would take that for Ulysses SP.)
    """

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    # Parameters are replicated over context-parallel ranks too, and each CP rank holds
    # a part of their gradient: DeepSpeed's "data parallel" group is DP × CP (as
    # Megatron's DDP), so it averages and shards ZeRO states over both.
    get_data_parallel_rank = staticmethod(partial(ps.get_data_parallel_rank,
                                                  with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(partial(ps.get_data_parallel_world_size,
                                                        with_context_parallel=True))
    get_data_parallel_group = staticmethod(partial(ps.get_data_parallel_group,
                                                   with_context_parallel=True))
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        ps.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed engine config for this run; ``zero.deepspeed`` is merged in last.
    ``dp_size``: DeepSpeed's data-parallel size, DP × CP (see ``MegatronMPU``)."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.zero.stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge_dicts(ds, cfg.zero.deepspeed)


def keep_fp32_grad_norm(engine) -> None:
    """Make ``engine.get_global_grad_norm()`` answer at ZeRO-0 in fp32 too: there DeepSpeed
    clips through ``clip_fp32_gradients``, which computes the global norm and drops it (its
    ZeRO and bf16 optimizers keep theirs)."""
    def clip_and_keep() -> None:
        engine._global_grad_norm = float(clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
            mpu=engine.mpu))

    engine.clip_fp32_gradients = clip_and_keep
