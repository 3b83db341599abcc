"""Markdown tables of a report: one row per setting, seeds pooled (mean ± half-range)."""

from __future__ import annotations

from cope_megatron.report.runs import Run, gather, passkey_means, stat


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(values: list[float], runs: list[Run], *path: str) -> str:
    s = stat(values)
    if s is not None:
        return str(s)
    statuses = {run.eval.get(path[0], {}).get(path[1], {}).get("status") for run in runs
                if run.eval}
    return "n/a" if "not applicable" in statuses else "–"


def lengths(groups: dict[str, list[Run]], protocol: str) -> list[str]:
    """Evaluation lengths present under ``protocol`` ("lengths" or "sliding"), sorted."""
    found = {int(k) for runs in groups.values() for r in runs if r.eval
             for k in r.eval.get(protocol, {})}
    return [str(k) for k in sorted(found)]


def perplexity_table(groups: dict[str, list[Run]], protocol: str) -> str | None:
    columns = lengths(groups, protocol)
    if not columns:
        return None
    rows = [[label, str(len(runs))] + [_cell(gather(runs, protocol, c, "ppl"), runs, protocol, c)
                                       for c in columns] for label, runs in groups.items()]
    return markdown_table(["setting", "seeds", *columns], rows)


def source_table(groups: dict[str, list[Run]]) -> str | None:
    """A mixture's validation perplexity per source at the training length, and its total
    (eval.json's ``mixture``)."""
    names: list[str] = []
    for runs in groups.values():
        for run in runs:
            for name in (run.eval or {}).get("mixture", {}).get("sources", {}):
                if name not in names:
                    names.append(name)
    if not names:
        return None
    rows = [[label, str(len(runs))]
            + [str(stat(gather(runs, "mixture", "sources", n, "ppl")) or "–") for n in names]
            + [str(stat(gather(runs, "mixture", "total", "ppl")) or "–")]
            for label, runs in groups.items()]
    return markdown_table(["setting", "seeds", *names, "total (weighted)"], rows)


def passkey_table(groups: dict[str, list[Run]]) -> str | None:
    """Accuracy per length, averaged over depths (and seeds)."""
    columns = lengths(groups, "passkey")
    if not columns:
        return None
    rows = []
    for label, runs in groups.items():
        row = [label]
        for c in columns:
            per_run = passkey_means(runs, c)
            row.append(str(stat(per_run)) if per_run else "n/a")
        rows.append(row)
    return markdown_table(["setting", *columns], rows)


def task_splits(groups: dict[str, list[Run]]) -> list[str]:
    found: list[str] = []
    for runs in groups.values():
        for run in runs:
            for split in (run.eval or {}).get("splits", {}):
                if split not in found:
                    found.append(split)
    return found


def task_table(groups: dict[str, list[Run]]) -> str | None:
    columns = task_splits(groups)
    if not columns:
        return None
    rows = [[label, str(len(runs))] + [_cell(gather(runs, "splits", c, "error_pct"), runs,
                                             "splits", c) for c in columns]
            for label, runs in groups.items()]
    return markdown_table(["setting", "seeds", *(f"{c} error %" for c in columns)], rows)


def harness_table(groups: dict[str, list[Run]]) -> str | None:
    """lm-evaluation-harness scores (``eval.harness_tasks``): one column per task and
    metric."""
    columns = sorted({(task, metric) for runs in groups.values() for r in runs if r.eval
                      for task, metrics in r.eval.get("harness", {}).get("tasks", {}).items()
                      for metric in metrics if not metric.endswith("_stderr,none")})
    if not columns:
        return None
    rows = [[label, str(len(runs))] + [
        str(stat(gather(runs, "harness", "tasks", task, metric)) or "–")
        for task, metric in columns] for label, runs in groups.items()]
    return markdown_table(["setting", "seeds", *(f"{t} {m}" for t, m in columns)], rows)


def training_table(groups: dict[str, list[Run]]) -> str:
    rows = []
    for label, runs in groups.items():
        last = [r.metrics[-1] for r in runs if r.metrics]
        rows.append([label, ", ".join(str(r.dir) for r in runs),
                     str(stat([m["step"] for m in last]) or "–"),
                     str(stat([m["loss"] for m in last]) or "–"),
                     str(stat([m["tokens_per_s"] for m in last]) or "–")])
    return markdown_table(["setting", "runs", "steps", "final loss", "tokens/s"], rows)
