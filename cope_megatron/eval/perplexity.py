"""Held-out perplexity at the training length and beyond (extrapolation sweep).

Windows of ``m × seq_length`` tokens are cut from the validation split read in order;
data-parallel ranks take alternate batches and sum token-weighted losses. Under context
parallelism the ranks of one replica share each window, each scoring its chunks, so a
context longer than one device holds is split across ranks. A position
encoding that cannot represent a length is reported as not applicable, not crashed on.
"""

from __future__ import annotations

import math
from itertools import islice

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.config import Config
from cope_megatron.data.loader import StreamSpec, sequential_windows, split_shards
from cope_megatron.distributed.parallel import replica_group
from cope_megatron.model.gpt import lm_loss, max_positions


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config, manifest: dict, device: torch.device,
             dp_rank: int = 0, dp_size: int = 1) -> dict:
    """{"lengths": {L: {"loss", "ppl", "tokens"} or {"status": "not applicable", ...}}}."""
    shards = split_shards(cfg.data.shards, manifest, "val")
    spec = StreamSpec(shards=shards, seq_len=manifest["seq_len"], dtype=manifest["dtype"],
                      tokenizer_sha256=manifest["tokenizer_sha256"], seed=0,
                      micro_batch_size=cfg.eval.batch_size)
    cp_size = parallel_state.get_context_parallel_world_size()
    was_training = model.training
    model.eval()
    results = {}
    for mult in cfg.eval.length_multipliers:
        length = mult * cfg.model.seq_length
        limit = max_positions(model)
        if limit is not None and length > limit:
            results[length] = {"status": "not applicable", "reason": f"{cfg.model.pe} has no "
                               f"positions beyond the {limit} it was trained with"}
            continue
        windows = sequential_windows(shards, spec, length + 1)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # [loss·tokens, tokens]
        for i in range(cfg.eval.batches):
            batch = list(islice(windows, cfg.eval.batch_size))
            if not batch:
                break
            if i % dp_size != dp_rank:
                continue
            tokens = torch.stack(batch).to(device)
            n = tokens.shape[0] * length // cp_size  # this rank's tokens under CP
            total += torch.tensor([lm_loss(model, tokens).item() * n, n],
                                  dtype=torch.float64, device=device)
        dist.all_reduce(total, group=replica_group())
        if total[1] == 0:
            results[length] = {"status": "not enough validation text",
                               "reason": f"no window of {length + 1} tokens in the val split"}
            continue
        loss = (total[0] / total[1]).item()
        results[length] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
                           "tokens": int(total[1].item())}
    model.train(was_training)
    return {"pe": cfg.model.pe, "train_length": cfg.model.seq_length, "lengths": results}
