"""Held-out perplexity against context length, by both protocols of Press et al. 2022
("Train Short, Test Long", arXiv 2108.12409).

Every length scores the same tokens: one evaluation text of ``eval.tokens`` (rounded up to a
whole number of the longest window) predicted tokens, read in order from a split, so the
lengths differ only in how much context each prediction had.
- ``windows``: the text cut into non-overlapping windows of the length; a prediction's
  context is what precedes it in its window.
- ``sliding``: windows of the length advancing by ``eval.stride`` tokens; each window scores
  only its last ``stride`` tokens (the first scores all), so every token is scored once
  with up to a window of context. At the training length with the default stride (the
  training length) both protocols are the same computation.
Data-parallel ranks take alternate batches; context-parallel ranks share each window. A
position encoding that cannot represent a length is reported as not applicable.

A run on a weighted mixture (``data.mixture``) also scores each source's validation split
at the training length (``per_source``); their total is the mixture-weighted mean loss,
the expected loss of a token drawn as training draws them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from cope_megatron.config import Config, ConfigError, EvalConfig
from cope_megatron.data.corpus import iter_pieces, resolve_sources
from cope_megatron.data.format import has_manifest, read_manifest
from cope_megatron.data.source import sequential_windows, split_spec
from cope_megatron.data.tokenizer import dataset_tokenizer
from cope_megatron.distributed.parallel import replica_group
from cope_megatron.eval.context import EvalContext
from cope_megatron.model.gpt import eval_mode, max_positions, token_losses

PROTOCOLS = ("windows", "sliding")


def window_plan(n_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(first token, first scored prediction within the window) per window of ``length``
    predictions over a text of ``n_tokens`` predictions; stride = length: non-overlapping.
    Needs n_tokens and length to be multiples of stride."""
    return [(begin, 0 if begin == 0 else length - stride)
            for begin in range(0, n_tokens - length + 1, stride)]


def evaluation_text(cfg: Config, manifest: dict) -> torch.Tensor:
    """The first scored-token count + 1 tokens of the evaluation text, as one 1-D tensor:
    the validation split of ``eval.data`` (a prepared shard directory; default
    ``data.shards``), or, when ``eval.data`` names files, directories or a glob of raw text,
    those files tokenized with the run's own tokenizer (documents EOS-separated, as prep
    packs them)."""
    longest = max(cfg.eval.length_multipliers) * cfg.model.seq_length
    n_tokens = -(-cfg.eval.tokens // longest) * longest
    source = cfg.eval.data or cfg.data.shards
    if has_manifest(source):
        text = _shard_text(cfg, manifest, source, n_tokens + 1)
    else:
        text = _raw_text(cfg, manifest, source, n_tokens + 1)
    if text is None:
        raise ConfigError(f"eval.tokens: {source} holds fewer than {n_tokens + 1} evaluation "
                          "tokens; lower eval.tokens or the length multipliers")
    return text


def _shard_text(cfg: Config, manifest: dict, shards_dir: str, count: int):
    if shards_dir != cfg.data.shards:
        own = manifest
        manifest = read_manifest(shards_dir)
        if manifest["tokenizer_sha256"] != own["tokenizer_sha256"]:
            raise ConfigError(f"eval.data: {shards_dir} was tokenized with another tokenizer "
                              f"than the run's; prepare it with data.tokenizer set to the "
                              f"run's {Path(cfg.data.shards) / own['tokenizer']}")
    return next(sequential_windows(split_spec(shards_dir, manifest, "val",
                                                verify=cfg.data.verify), count), None)


def _raw_text(cfg: Config, manifest: dict, source: str, count: int):
    tokenizer = dataset_tokenizer(cfg.data.shards, manifest)
    ids: list[int] = []
    d = cfg.data
    for path in resolve_sources([source], d.cache_dir):
        for piece in iter_pieces(path, d.text_field, d.decode_errors, join_rows=d.join_rows,
                                 join_rows_n=d.join_rows_n):
            ids += tokenizer.encode(piece.text) + ([manifest["eos_id"]] if piece.last else [])
            if len(ids) >= count:
                return torch.tensor(ids[:count])
    return None


def per_source(ctx: EvalContext, cfg: Config) -> dict:
    """{"sources": {name: {"loss", "ppl", "tokens", "weight"}}, "total": {"loss", "ppl"}}:
    ``eval.tokens`` (rounded up to whole windows) of each source's validation split in
    non-overlapping windows of the training length; weights normalized."""
    length = ctx.train_length
    n_tokens = -(-cfg.eval.tokens // length) * length
    total_weight = sum(s.weight for s in cfg.data.mixture)
    results: dict[str, dict] = {}
    with eval_mode(ctx.model):
        for i, source in enumerate(cfg.data.mixture):
            spec = split_spec(source.shards, read_manifest(source.shards), "val",
                              verify=cfg.data.verify)
            text = next(sequential_windows(spec, n_tokens + 1), None)
            if text is None:
                raise ConfigError(f"eval.tokens: the validation split of data.mixture[{i}] "
                                  f"({source.label}) holds fewer than {n_tokens + 1} tokens; "
                                  "lower eval.tokens")
            result = score(ctx, text, length, length, cfg.eval.batch_size)
            results[source.label] = {**result, "weight": source.weight / total_weight}
    loss = sum(r["loss"] * r["weight"] for r in results.values())
    return {"sources": results, "total": {"loss": loss, "ppl": math.exp(min(loss, 50.0))}}


@torch.no_grad()
def score(ctx: EvalContext, text: torch.Tensor, length: int, stride: int,
          batch_size: int) -> dict:
    """Loss over every prediction of ``text`` with windows of ``length`` tokens."""
    plan = window_plan(len(text) - 1, length, stride)
    device = ctx.device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [Σ loss, scored tokens]
    for i, start in enumerate(range(0, len(plan), batch_size)):
        if not ctx.takes(i):
            continue
        batch = plan[start:start + batch_size]
        tokens = torch.stack([text[b:b + length + 1] for b, _ in batch]).to(device)
        mask = torch.zeros(len(batch), length, device=device)
        for row, (_, first) in enumerate(batch):
            mask[row, first:] = 1
        losses, mask = token_losses(ctx.model, tokens, mask)
        total += torch.stack([(losses.double() * mask).sum(), mask.double().sum()])
    dist.all_reduce(total, group=replica_group())
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(total[1].item())}


def evaluate(ctx: EvalContext, e: EvalConfig, text: torch.Tensor) -> dict:
    """Both protocols at every length of ``e`` on ``text`` (``evaluation_text``):
    {"lengths": {L: windows result}, "sliding": {L: sliding result}, ...}; a result is
    {"loss", "ppl", "tokens"} or {"status": "not applicable", "reason"}."""
    stride = e.stride or ctx.train_length
    limit = max_positions(ctx.model)
    with eval_mode(ctx.model):
        results: dict[str, dict] = {p: {} for p in PROTOCOLS}
        for mult in e.length_multipliers:
            length = mult * ctx.train_length
            for protocol in PROTOCOLS:
                if limit is not None and length > limit:
                    results[protocol][length] = {
                        "status": "not applicable",
                        "reason": f"{ctx.pe} has no positions beyond the {limit} it was "
                                  "trained with"}
                    continue
                step = length if protocol == "windows" else stride
                results[protocol][length] = score(ctx, text, length, step, e.batch_size)
    return {"pe": ctx.pe, "train_length": ctx.train_length,
            "eval_data": e.data or ctx.shards, "stride": stride,
            "lengths": results["windows"], "sliding": results["sliding"]}
