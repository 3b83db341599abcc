"""Effective context length (RULER, §4): the longest evaluated length whose score is at
least a threshold. RULER's threshold is a reference model's score at 4K; an ablation's
models are their own reference: by default a fraction of the model's score at its
training length (``eval.ruler.threshold``), or an absolute score
(``eval.ruler.absolute_threshold``). Lengths without a score (not applicable) are not
evaluated lengths; a score not at the threshold at any length gives no length, said so.
"""

from __future__ import annotations


def effective_length(scores: dict[int, float | None], train_length: int, threshold: float,
                     absolute: float | None = None) -> dict:
    """{"length", "threshold"} or {"status": "not applicable", "reason"}; ``scores``:
    length -> mean score (None: not applicable there)."""
    if absolute is not None:
        bar = absolute
    else:
        own = scores.get(train_length)
        if own is None:
            return {"status": "not applicable",
                    "reason": f"no score at the training length {train_length} to scale the "
                              "threshold from; set eval.ruler.absolute_threshold or include "
                              "1 in the lengths with a prompt that fits it"}
        if own == 0:
            return {"status": "not applicable",
                    "reason": f"the model scores 0 at its training length {train_length}: "
                              "a threshold relative to it would pass every length"}
        bar = threshold * own
    passing = [length for length, s in scores.items() if s is not None and s >= bar]
    if not passing:
        return {"length": None, "threshold": bar,
                "reason": "below the threshold at every evaluated length"}
    return {"length": max(passing), "threshold": bar}


def mean_over_tasks(rows: dict[str, dict[int, dict]], method: str) -> dict[int, float | None]:
    """length -> the mean of every task's score there (None when any task is not
    applicable at that length: an average over fewer tasks is not comparable)."""
    lengths = sorted({length for per_length in rows.values() for length in per_length})
    means: dict[int, float | None] = {}
    for length in lengths:
        row = [rows[task].get(length, {}).get("mean", {}).get(method) for task in rows]
        means[length] = None if any(s is None for s in row) else sum(row) / len(row)
    return means
