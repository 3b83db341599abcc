"""Error % of a model trained on a synthetic task, on each of its test splits.

An answer is wrong when greedy decoding would not produce it (``answer_errors``); the
error is over answer tokens (flip-flop's bits after ``r``, selective copy's copied
tokens, counting's one value) and, beside it, over whole sequences. Test splits may be
longer than the training length (selective copy's OOD sparse): a PE that cannot represent
a split's length is reported as not applicable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from cope_megatron.data.source import ordered_samples, split_spec
from cope_megatron.eval.answers import answer_errors
from cope_megatron.eval.context import EvalContext
from cope_megatron.model.gpt import eval_mode, max_positions


def _batches(spec, batch_size: int):
    rows = []
    for tokens, mask in ordered_samples(spec):
        rows.append((tokens.astype(np.int64), mask.astype(np.float32)))
        if len(rows) == batch_size:
            yield rows
            rows = []
    if rows:
        yield rows


@torch.no_grad()
def task_errors(ctx: EvalContext, batch_size: int, splits: list[str] | None = None) -> dict:
    """{"task": name, "splits": {split: {"error_pct", "sequence_error_pct", "answers",
    "sequences", "seq_len"} or {"status": "not applicable", "reason"}}} for ``splits``
    (default: every split but train)."""
    limit = max_positions(ctx.model)
    manifest = ctx.manifest
    with eval_mode(ctx.model):
        results = {}
        for split in splits or [s for s in manifest["splits"] if s != "train"]:
            spec = split_spec(ctx.shards, manifest, split, verify=ctx.verify)
            if limit is not None and spec.seq_len > limit:
                results[split] = {"status": "not applicable",
                                  "reason": f"{spec.seq_len} tokens exceed the {limit} positions "
                                            f"{ctx.pe} was trained with"}
                continue
            # [wrong answers, answers, wrong sequences, sequences]
            counts = torch.zeros(4, dtype=torch.float64, device=ctx.device)
            for i, rows in enumerate(_batches(spec, batch_size)):
                if not ctx.takes(i):
                    continue
                tokens = torch.from_numpy(np.stack([t for t, _ in rows])).to(ctx.device)
                mask = torch.from_numpy(np.stack([m for _, m in rows])).to(ctx.device)
                errors = answer_errors(ctx.model, tokens, mask).double()
                counts += torch.stack([errors.sum(), mask.double().sum(),
                                       (errors > 0).double().sum(), counts.new_tensor(len(rows))])
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
            wrong, answers, wrong_seqs, seqs = counts.tolist()
            results[split] = {"error_pct": 100 * wrong / answers,
                              "sequence_error_pct": 100 * wrong_seqs / seqs,
                              "answers": int(answers), "sequences": int(seqs),
                              "seq_len": spec.seq_len}
    return {"task": manifest["task"]["name"], "splits": results}
