"""The DeepSpeed engine of a run: built from the config and the resolved PE, and restored
from the run's latest checkpoint, converted first when its ZeRO states were partitioned
for another data-parallel size. Training and evaluation both start here."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from cope_megatron import checkpoint
from cope_megatron.checkpoint.universal import (
    checkpoint_info,
    convert,
    needs_conversion,
    read_layout,
    stage_family,
)
from cope_megatron.config import Config, Layout
from cope_megatron.distributed.deepspeed_glue import (
    MegatronMPU,
    deepspeed_config,
    keep_fp32_grad_norm,
)
from cope_megatron.distributed.parallel import DistEnv, replica_group
from cope_megatron.distributed.sequence_parallel import register_sequence_parallel_grad_hooks
from cope_megatron.model.documents import document_eos
from cope_megatron.model.gpt import build_gpt
from cope_megatron.pe import ModelPE
from cope_megatron.training.nonfinite import SkipNonFiniteAdamW
from cope_megatron.training.schedule import lr_at


def build_engine(cfg: Config, pe: ModelPE, vocab_size: int,
                 load_universal: bool = False, document_eos: int | None = None):
    """GPT + AdamW + LR schedule wrapped in a DeepSpeed engine (ZeRO per ``zero.stage``);
    ``load_universal``: the engine will load a universal checkpoint; ``document_eos``: see
    ``build_gpt``."""
    model = build_gpt(cfg, pe, vocab_size, document_eos)
    model.universal_checkpoint_info = checkpoint_info(model)  # saved with every checkpoint
    if cfg.parallel.sequence:
        register_sequence_parallel_grad_hooks(model)
    t = cfg.train
    optimizer = SkipNonFiniteAdamW(
        model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
        check=cfg.zero.stage == 0 and t.precision == "fp32")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps,
                           total=t.steps, decay=t.lr_decay) / t.lr,
    )
    ds_config = deepspeed_config(cfg, dist.get_world_size(replica_group()))
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config,
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    keep_fp32_grad_norm(engine)
    return engine


def run_layout(cfg: Config) -> dict:
    """The parallel layout saved with each checkpoint (``layout.json``)."""
    return Layout.of(cfg, dist.get_world_size()).record()


def loadable(cfg: Config, env: DistEnv, run_dir: Path, tag: str) -> str:
    """``tag``, or its universal conversion when its ZeRO states were partitioned for
    another data-parallel size."""
    root = checkpoint.checkpoint_dir(run_dir)
    saved = read_layout(root / tag)
    if not needs_conversion(saved, run_layout(cfg)):
        return tag
    if stage_family(saved["zero_stage"]) != stage_family(cfg.zero.stage):
        raise checkpoint.CheckpointError(
            f"checkpoint {root / tag} was saved under ZeRO-{saved['zero_stage']} on "
            f"{saved['data_parallel']} data-parallel ranks; resuming on another number "
            "converts it to a universal checkpoint, which loads into stages 1-2 when "
            "saved from 1-2, into stage 3 when saved from 3: set zero.stage accordingly")
    if env.is_main:
        convert(root, tag)
    dist.barrier()
    return f"{tag}_universal"


def restore(cfg: Config, pe: ModelPE, env: DistEnv, manifest: dict, *,
            tag: str | None = checkpoint.LATEST) -> tuple[object, dict | None]:
    """The run's engine for the data set of ``manifest``, with checkpoint ``tag`` of
    ``run.dir`` loaded into it, and that checkpoint's client state; ``tag=None``: no
    checkpoint (state None); by default, the one ``checkpoint.resumable_tag`` picks (none
    yet: no checkpoint)."""
    run_dir = Path(cfg.run.dir)
    if tag == checkpoint.LATEST:
        tag, note = checkpoint.resumable_tag(run_dir)
        if note and env.is_main:
            print(f"[checkpoint] {note}", flush=True)
    if tag is not None:
        tag = loadable(cfg, env, run_dir, tag)
    engine = build_engine(cfg, pe, manifest["vocab_size"],
                          load_universal=bool(tag and tag.endswith("_universal")),
                          document_eos=document_eos(cfg, manifest))
    state = checkpoint.load(engine, run_dir, tag) if tag else None
    return engine, state
