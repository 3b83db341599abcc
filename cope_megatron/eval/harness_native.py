"""lm-evaluation-harness over our own Megatron model (``eval.harness_model=native``): the
run's checkpoint at the run's layout, so harness tasks run under tensor and context
parallelism at lengths one process cannot hold, with no export.

The harness runs on rank 0 alone (it reads datasets, builds prompts, aggregates); each
batch of token sequences it asks for is broadcast to every rank, all ranks run the
forward together, and every rank of a replica ends with the same per-sequence results
(the vocabulary and sequence shares are reduced inside the replica). Data-parallel
replicas take alternate sub-batches and add up their results. Sequences are padded on
the right to a length every layout can split (Megatron's head-tail split under CP, the
sequence-parallel split over TP); a causal model's scores do not see the padding.

The harness's own ``HFLM`` needs a ``transformers`` model on one process; its request
handling (left truncation to ``max_length``, disjoint rolling windows, stop sequences)
is repeated here on token lists so that scores equal the export's (tested to 1e-4).
Generation recomputes the prefix for every token: Megatron's inference KV cache does not
run our PEs' attention (CoPE, FoX, ...), and harness answers are a few tokens long.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from megatron.core import parallel_state

from cope_megatron.config import ConfigError
from cope_megatron.eval.context import EvalContext
from cope_megatron.eval.ruler.decode import argmax_ids, vocab_argmax
from cope_megatron.model.gpt import eval_mode, max_positions, model_batch, run_model

_STOP = "stop"


class NativeLM(TemplateLM):
    """An ``lm_eval`` LM over ``ctx.model`` (a GPTModel or its DeepSpeed engine) on every
    rank; rank 0 hands it to the harness, the other ranks ``serve``."""

    def __init__(self, ctx: EvalContext, batch_size: int, max_length: int) -> None:
        super().__init__()
        limit = max_positions(ctx.model)
        if limit is not None and max_length > limit:
            raise ConfigError(f"eval.harness_max_length: {ctx.pe} has no positions beyond "
                              f"the {limit} it was trained with; give at most {limit}")
        self.ctx, self.batch_size, self.max_length = ctx, batch_size, max_length
        self.tok = ctx.tokenizer()  # the data set's, which the export ships
        cp = parallel_state.get_context_parallel_world_size()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.multiple = (2 * cp if cp > 1 else 1) * tp  # CP's 2·cp chunks, each split by SP

    # -- the harness's interface (rank 0) --------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(Σ log p(continuation), whether it is the greedy continuation) per request of
        (strings, context tokens, continuation tokens), the input cut from the left to
        ``max_length`` tokens as the harness's HF backend does."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=self.batch_size * self.ctx.dp_size):
            rows = [(r[1] + r[2])[-(self.max_length + 1):] for r in chunk]
            results += self._collective("score", [(row, len(r[2])) for row, r in
                                                  zip(rows, chunk)])
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole text over disjoint windows of ``max_length`` tokens, each
        with the context the window before leaves (the harness's ``HFLM`` windows)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (or the end-of-text token,
        or ``max_gen_toks`` tokens); contexts keep their last max_length − max_gen_toks
        tokens, as in the HF backend."""
        eos = self.tok.token(self.eot_token_id)  # as the export's tokenizer writes it
        jobs = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
            if kwargs.get("do_sample"):
                raise ConfigError("eval.harness_model=native decodes greedily; a task "
                                  "asking for sampling needs eval.harness_model=export")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            steps = kwargs["max_gen_toks"]
            keep = self.max_length - steps
            if keep < 1:
                raise ConfigError(f"eval.harness_max_length: {self.max_length} tokens leave "
                                  f"no context before {steps} generated ones")
            jobs.append((self.tok_encode(context)[-keep:], until, steps))
        outputs = []
        for start in range(0, len(jobs), self.batch_size * self.ctx.dp_size):
            outputs += self._collective("generate", jobs[start:start + self.batch_size
                                                          * self.ctx.dp_size])
        return outputs

    # -- every rank --------------------------------------------------------------------------

    def _collective(self, op: str, payload: list) -> list:
        """Run ``op`` on every rank (rank 0 names it and its payload)."""
        box = [(op, payload)]
        dist.broadcast_object_list(box, src=0)
        return getattr(self, f"_{op}")(payload)

    def serve(self) -> None:
        """On ranks other than 0: run what rank 0 broadcasts until it says stop."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            op, payload = box[0]
            if op == _STOP:
                return
            getattr(self, f"_{op}")(payload)

    def release(self) -> None:
        """On rank 0, when the harness is done (or failed): the other ranks return."""
        dist.broadcast_object_list([(_STOP, None)], src=0)

    def _shares(self, items: list) -> list[tuple[int, list]]:
        """(offset, sub-batch) of ``items`` that this data-parallel replica scores."""
        starts = range(0, len(items), self.batch_size)
        return [(s, items[s:s + self.batch_size]) for i, s in enumerate(starts)
                if self.ctx.takes(i)]

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        out = torch.zeros(len(rows), 2, dtype=torch.float64, device=self.ctx.device)
        for offset, batch in self._shares(rows):
            lengths = [len(seq) for seq, _ in batch]
            b = model_batch(self.ctx.model,
                            self._padded([seq for seq, _ in batch], max(lengths)))
            logits = run_model(self.ctx.model, b).float()
            logprob = _vocab_parallel_logprob(logits, b["labels"])
            missed = vocab_argmax(logits) != b["labels"]
            # Continuation token t is predicted at position t − 1.
            first = torch.tensor([n - 1 - c for n, (_, c) in zip(lengths, batch)])[:, None]
            last = torch.tensor(lengths)[:, None] - 2
            where = b["position_ids"]
            scored = ((where >= first.to(where.device)) & (where <= last.to(where.device)))
            sums = torch.stack([(logprob.double() * scored).sum(-1),
                                (missed & scored).double().sum(-1)], dim=-1)
            if parallel_state.get_context_parallel_world_size() > 1:
                dist.all_reduce(sums, group=parallel_state.get_context_parallel_group())
            out[offset:offset + len(batch)] = sums
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        return [(lp, misses == 0) for lp, misses in out.tolist()]

    @torch.no_grad()
    def _generate(self, jobs: list[tuple[list[int], list[str], int]]) -> list[str]:
        mine = {offset: self._greedy(batch) for offset, batch in self._shares(jobs)}
        group = parallel_state.get_data_parallel_group()
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        merged = {k: v for part in everyone for k, v in part.items()}
        return [text for offset in sorted(merged) for text in merged[offset]]

    def _greedy(self, jobs: list[tuple[list[int], list[str], int]]) -> list[str]:
        """Greedy continuations of a batch: every row, until it stops, gains its argmax
        next token per forward; every rank of the replica decides the same."""
        rows = [list(context) for context, _, _ in jobs]
        new: list[list[int]] = [[] for _ in jobs]
        active = list(range(len(jobs)))
        while active:
            ids = argmax_ids(self.ctx.model, self._padded(
                [rows[i] for i in active], max(len(rows[i]) for i in active) + 1))
            still = []
            for j, i in enumerate(active):
                token = int(ids[j, len(rows[i]) - 1])
                if token == self.eot_token_id:
                    continue
                rows[i].append(token)
                new[i].append(token)
                text = self.tok_decode(new[i])
                _, until, steps = jobs[i]
                if len(new[i]) < steps and not any(stop and stop in text for stop in until):
                    still.append(i)
            active = still
        return [postprocess_generated_text(self.tok_decode(toks), until, None)
                for toks, (_, until, _) in zip(new, jobs)]

    def _padded(self, rows: list[list[int]], span: int) -> torch.Tensor:
        """``rows`` as [b, s + 1] tokens on the device, s ≥ span − 1 rounded up to a
        length every layout splits (the padding follows every row's tokens)."""
        inputs = math.ceil((span - 1) / self.multiple) * self.multiple
        tokens = torch.full((len(rows), inputs + 1), self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        return tokens.to(self.ctx.device)


def _vocab_parallel_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) [b, s] from vocab-parallel ``logits`` [b, s, v/TP], the same on every
    TP rank (Megatron's vocab-parallel cross-entropy computes it too, but only inside the
    model's forward with labels, which would then not return the logits for the argmax)."""
    group = parallel_state.get_tensor_model_parallel_group()
    width = logits.shape[-1]
    offset = parallel_state.get_tensor_model_parallel_rank() * width
    top = logits.max(-1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(logits - top[..., None]).sum(-1)
    mine = (labels >= offset) & (labels < offset + width)
    target = logits.gather(-1, (labels - offset).clamp(0, width - 1)[..., None])[..., 0]
    target = torch.where(mine, target, torch.zeros_like(target))
    dist.all_reduce(sum_exp, group=group)
    dist.all_reduce(target, group=group)
    return target - top - torch.log(sum_exp)


def run_native_harness(ctx: EvalContext, run_dir: str | Path, step: int, tasks: list[str], *,
                       include: str | None, limit: int | None, batch_size: int,
                       max_length: int) -> dict | None:
    """``tasks`` on ``ctx.model``, every rank taking part; the result (written to the
    run's harness.json) on rank 0, None elsewhere."""
    from cope_megatron.hf.harness import run_harness

    lm = NativeLM(ctx, batch_size, max_length)
    with eval_mode(ctx.model):
        if dist.get_rank() != 0:
            lm.serve()
            return None
        try:
            return run_harness(run_dir, step, tasks, include=include, limit=limit, lm=lm)
        finally:
            lm.release()
