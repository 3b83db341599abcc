"""Loss against position: over non-overlapping windows of each evaluation length, the
mean next-token loss at every position of the window (does a prediction gain from
context far back?), and the perplexity of each window's last ``k`` tokens, which at m×
the training length have at least (m − 1)·T tokens of context (Press et al. 2022, arXiv
2108.12409, whose perplexity over whole windows mixes in predictions with almost none).

The same evaluation text as ``perplexity`` and its batching: data-parallel ranks take
alternate batches, context-parallel ranks hold their shares of each window, placed by
their global position ids; the sums meet over data × context parallel ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from cope_megatron.config import EvalConfig
from cope_megatron.distributed.parallel import replica_group
from cope_megatron.eval.context import EvalContext
from cope_megatron.eval.perplexity import window_plan
from cope_megatron.model.gpt import eval_mode, max_positions, shifted_batch, token_losses


@torch.no_grad()
def position_sums(ctx: EvalContext, text: torch.Tensor, length: int, batch_size: int
                  ) -> torch.Tensor:
    """[length] Σ loss at each window position over the non-overlapping windows of
    ``text`` (float64, summed over all ranks)."""
    plan = window_plan(len(text) - 1, length, length)
    sums = torch.zeros(length, dtype=torch.float64, device=ctx.device)
    for i, start in enumerate(range(0, len(plan), batch_size)):
        if not ctx.takes(i):
            continue
        batch = plan[start:start + batch_size]
        tokens = torch.stack([text[b:b + length + 1] for b, _ in batch]).to(ctx.device)
        losses, _ = token_losses(ctx.model, tokens)
        positions = shifted_batch(tokens)["position_ids"]  # this CP rank's share
        sums.index_add_(0, positions.reshape(-1), losses.double().reshape(-1))
    dist.all_reduce(sums, group=replica_group())
    return sums


def _curve(mean: torch.Tensor, bins: int) -> tuple[int, list[float]]:
    width = -(-len(mean) // min(bins, len(mean)))
    return width, [mean[i:i + width].mean().item() for i in range(0, len(mean), width)]


def position_loss(ctx: EvalContext, e: EvalConfig, text: torch.Tensor) -> dict:
    """{length: {"bin_width", "loss": [mean loss per bin of positions], "last_k",
    "last_k_loss", "last_k_ppl", "windows"} or {"status": "not applicable", "reason"}}."""
    k = e.last_k or ctx.train_length
    limit = max_positions(ctx.model)
    results: dict[int, dict] = {}
    with eval_mode(ctx.model):
        for mult in e.length_multipliers:
            length = mult * ctx.train_length
            if limit is not None and length > limit:
                results[length] = {"status": "not applicable",
                                   "reason": f"{ctx.pe} has no positions beyond the {limit} "
                                             "it was trained with"}
                continue
            windows = len(window_plan(len(text) - 1, length, length))
            mean = position_sums(ctx, text, length, e.batch_size) / windows
            width, curve = _curve(mean, e.position_bins)
            last = mean[-k:].mean().item()
            results[length] = {"bin_width": width, "loss": curve, "last_k": k,
                               "last_k_loss": last, "last_k_ppl": math.exp(min(last, 50.0)),
                               "windows": windows}
    return results
