"""The suite's grid: every task of ``eval.ruler.tasks`` at every length and depth, scored
both ways; averaged per length and summarized as effective lengths; and what each length
cost (tokens read by the model, wall time).

A length the PE cannot represent, or one too short for a task's prompt and answer, is a
row marked not applicable with its reason, never a zero.
"""

from __future__ import annotations

import time

import torch

from cope_megatron.config import EvalConfig
from cope_megatron.eval.context import EvalContext
from cope_megatron.eval.ruler.effective import effective_length, mean_over_tasks
from cope_megatron.eval.ruler.prompt import Encoder, Haystack, PromptTooLongError, Sample
from cope_megatron.eval.ruler.scoring import score_samples
from cope_megatron.eval.ruler.tasks import TASKS, generate
from cope_megatron.model.gpt import eval_mode, max_positions


def haystack(ctx: EvalContext, e: EvalConfig, text: torch.Tensor) -> Haystack:
    """``eval.ruler.haystack``: the evaluation text (``perplexity.evaluation_text``) or
    RULER's noise sentences."""
    if e.ruler.haystack == "noise":
        return Haystack.noise(ctx.tokenizer())
    return Haystack(text.tolist(), f"evaluation text ({e.data or ctx.shards})")


def _task_row(ctx: EvalContext, e: EvalConfig, enc: Encoder, hay: Haystack, task: str,
              length: int) -> tuple[dict, int]:
    """One task at one length: {"depths": {depth ("all" for a task without one): {method:
    score}}, "mean", "samples"} or not applicable; and the tokens the model read for it."""
    r = e.ruler
    depths = r.depths if TASKS[task].uses_depth else [None]
    grid: dict[str, list[Sample]] = {}
    try:
        for depth in depths:
            grid["all" if depth is None else str(depth)] = [
                generate(task, seed=r.seed, tokenizer=enc.tokenizer, length=length,
                         depth=depth, haystack=hay, index=i) for i in range(r.samples)]
    except PromptTooLongError as err:
        return {"status": "not applicable", "reason": str(err)}, 0
    scores, read = {}, 0
    for depth, samples in grid.items():
        scores[depth], tokens = score_samples(ctx, samples, r.scoring, e.batch_size, enc)
        read += tokens
    mean = {m: sum(s[m] for s in scores.values()) / len(scores) for m in r.scoring}
    return {"depths": scores, "mean": mean, "samples": r.samples}, read


def ruler_suite(ctx: EvalContext, e: EvalConfig, text: torch.Tensor) -> dict:
    """{"tasks": {task: {length: row}}, "average": {method: {length: mean or None}},
    "effective_length": {method: {"all" | task: result}}, "cost": {length: {"tokens_read"
    (prompt tokens × forwards: greedy decoding adds one per wrong token), "wall_s"}}, and
    the settings they came from}."""
    r = e.ruler
    enc, hay = Encoder(ctx.tokenizer()), haystack(ctx, e, text)
    limit = max_positions(ctx.model)
    rows: dict[str, dict[int, dict]] = {task: {} for task in r.tasks}
    cost: dict[int, dict] = {}
    with eval_mode(ctx.model):
        for mult in r.length_multipliers or e.length_multipliers:
            length = mult * ctx.train_length
            if limit is not None and length > limit:
                for task in r.tasks:
                    rows[task][length] = {"status": "not applicable",
                                          "reason": f"{ctx.pe} has no positions beyond the "
                                                    f"{limit} it was trained with"}
                continue
            start, read = time.perf_counter(), 0
            for task in r.tasks:
                rows[task][length], tokens = _task_row(ctx, e, enc, hay, task, length)
                read += tokens
            cost[length] = {"tokens_read": read, "wall_s": time.perf_counter() - start}
    average = {m: mean_over_tasks(rows, m) for m in r.scoring}
    def effective(scores: dict[int, float | None]) -> dict:
        return effective_length(scores, ctx.train_length, r.threshold, r.absolute_threshold)

    summary = {m: {"all": effective(average[m]),
                   **{task: effective({k: v.get("mean", {}).get(m) for k, v in per.items()})
                      for task, per in rows.items()}}
               for m in r.scoring}
    return {"pe": ctx.pe, "train_length": ctx.train_length, "haystack": hay.name,
            "seed": r.seed, "samples": r.samples, "tasks": rows, "average": average,
            "effective_length": summary, "cost": cost}
