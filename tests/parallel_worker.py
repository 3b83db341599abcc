"""One rank of tests/test_parallel.py's launches (forked from pytest, or under torchrun on
a GPU): for each layout in turn, train each of its PE variants 3 steps with DeepSpeed and
write losses and full PE-parameter gradients (rank 0). One launch serves every layout of
one world size.

    torchrun --nproc-per-node 2 tests/parallel_worker.py '{"out": "/tmp/r.json", "layouts":
        {"tp2_sp": {"tensor": 2, "sequence": true, "context": 1, "zero": 0,
                    "variants": {"rope": ["model.pe=rope"]}}}}'
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.config import load_config, validate
from cope_megatron.distributed.parallel import (
    init_distributed,
    mean_over_replicas,
    seed_everything,
)
from cope_megatron.model.gpt import lm_loss
from cope_megatron.pe import REGISTRY, model_pe
from cope_megatron.training.engine import build_engine
from tests.helpers import forked_ranks, torchrun

VOCAB, SEQ, GLOBAL_BATCH, STEPS = 128, 32, 4, 3
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.num_query_groups=2", f"model.seq_length={SEQ}", "pe.cope.npos_max=8",
        "train.lr=1e-2", "train.min_lr=1e-2", "train.warmup_steps=1", "train.grad_clip=0.05",
        "train.seed=5"]
VARIANTS = {pe: [f"model.pe={pe}"] for pe in sorted(REGISTRY)}
VARIANTS["cope_per_head"] = ["model.pe=cope", "pe.cope.shared_table=false"]
VARIANTS["schedule"] = ["model.pe=cope", "model.pe_schedule=[rope,cope]"]
VARIANTS["length_scale"] = ["model.pe=cope", "pe.length_scale.type=learned"]
SCALED = {  # RoPE scaling beyond L₀ = 8 within the 32 trained tokens; one layout only
    "rope_yarn": ["model.pe=rope", "pe.rope_scaling.type=yarn", "pe.rope_scaling.factor=4",
                  "pe.rope_scaling.original_length=8"],
    "rope_dynamic": ["model.pe=rope", "pe.rope_scaling.type=dynamic",
                     "pe.rope_scaling.factor=2", "pe.rope_scaling.original_length=8"],
}
"""Trained by the reference and by the one layout that splits the sequence both ways
(CP × TP with SP): dynamic NTK must see the whole length on every rank."""
WORKER = Path(__file__)


def pick(*names: str) -> dict:
    return {k: {**VARIANTS, **SCALED}[k] for k in names}


def layout(tensor, sequence, zero, variants=VARIANTS, context=1) -> dict:
    return {"tensor": tensor, "sequence": sequence, "context": context, "zero": zero,
            "variants": variants}


def launch(tmp_path, nproc: int, layouts: dict) -> dict:
    """``layouts`` trained on ``nproc`` ranks: forked on the CPU, torchrun on a GPU."""
    out = tmp_path / f"n{nproc}.json"
    job = {"layouts": layouts, "out": str(out)}
    if torch.cuda.is_available():
        torchrun(nproc, [str(WORKER), json.dumps(job)])
    else:
        forked_ranks(nproc, main, job)
    return json.loads(out.read_text())


def pe_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters()
            if "core_attention" in n or "position_embeddings" in n or "linear_gate" in n}


def unshard(param: torch.nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the parameter or its gradient) gathered to the whole TP=1 shape."""
    tensor = tensor.detach().clone()
    if getattr(param, "tensor_model_parallel", False):
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
        tensor = torch.cat(parts, dim=param.partition_dim)
    return tensor


def run_variant(overrides: list[str], layout: dict) -> dict:
    cfg = load_config(BASE + overrides + [
        f"parallel.tensor={layout['tensor']}",
        f"parallel.sequence={str(layout['sequence']).lower()}",
        f"parallel.context={layout['context']}",
        f"zero.stage={layout['zero']}"])
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    env = init_distributed(cfg.parallel.tensor, cfg.parallel.context)
    seed_everything(cfg.train.seed)
    cfg.train.micro_batch_size = GLOBAL_BATCH // env.dp_size
    engine = build_engine(cfg, model_pe(cfg.model), VOCAB)
    # A checksum per whole parameter: equal across layouts iff initialization is.
    init = {n: unshard(p, p).double().sum().item() + unshard(p, p).double().abs().sum().item()
            for n, p in engine.module.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for _ in range(STEPS):
        batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        mb = cfg.train.micro_batch_size
        loss = lm_loss(engine, batch[env.dp_rank * mb: (env.dp_rank + 1) * mb])
        engine.backward(loss)
        if layout["zero"] == 0:
            grads.append({n: unshard(p, p.grad).tolist()
                          for n, p in pe_parameters(engine.module).items()})
        engine.step()
        losses.append(mean_over_replicas(loss))
    params = sum(p.numel() for p in engine.module.parameters()) if layout["zero"] < 3 else None
    destroy_groups()
    return {"losses": losses, "grads": grads, "init": init, "params_per_rank": params}


def destroy_groups() -> None:
    """Megatron's groups, destroyed before the next variant makes its own:
    ``destroy_model_parallel`` only forgets them, and a four-rank launch's variants left
    each rank over 300 gloo groups, each with a loop thread polling."""
    parallel_state.destroy_model_parallel()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


def main(job: dict) -> None:
    """Run ``job`` (``layouts`` to train, ``out``: where rank 0 writes the results)."""
    results = {layout_name: {name: run_variant(ov, layout)
                             for name, ov in layout["variants"].items()}
               for layout_name, layout in job["layouts"].items()}
    if dist.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
