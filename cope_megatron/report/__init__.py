"""``cope-megatron report RUN_DIR...``: a markdown table and PNG plots from finished runs.

Perplexity against evaluation length (both protocols) and per mixture source, passkey
accuracy by length, task error per test split, and training-loss curves, written into one
report directory; runs with long-context results also get their page (``long_context``).
"""

from __future__ import annotations

from pathlib import Path

from cope_megatron.report import long_context, plots, tables
from cope_megatron.report.runs import ReportError, by_task, group, load_run

__all__ = ["ReportError", "write_report"]


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write ``report.md`` and its PNGs into ``out``; returns the markdown's path."""
    if not run_dirs:
        raise ReportError("report: give at least one run directory")
    runs = by_task([load_run(d) for d in run_dirs])
    unfinished = [r for r in runs if r.eval is None]
    groups = group([r for r in runs if r.eval is not None])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# Report\n", f"{len(runs)} runs; settings pooled over seeds as mean ± "
                "half-range. n/a: the position encoding cannot run at that length.\n"]
    figures = {
        "Perplexity against evaluation length": plots.perplexity_plot(
            groups, out / "perplexity_vs_length.png"),
        "Passkey retrieval": plots.passkey_plot(groups, out / "passkey.png"),
        "Task error": plots.task_plot(groups, out / "task_error.png"),
        "Downstream tasks": None,
        "Training loss": plots.loss_plot(group(runs), out / "training_loss.png"),
    }
    blocks = {
        "Perplexity against evaluation length": [
            ("Non-overlapping windows", tables.perplexity_table(groups, "lengths")),
            ("Sliding window", tables.perplexity_table(groups, "sliding")),
            ("Per mixture source, at the training length", tables.source_table(groups))],
        "Passkey retrieval": [("Accuracy, mean over depths", tables.passkey_table(groups))],
        "Task error": [("Error % on answer tokens", tables.task_table(groups))],
        "Downstream tasks": [("lm-evaluation-harness", tables.harness_table(groups))],
        "Training loss": [("Last logged step", tables.training_table(group(runs)))],
    }
    for title, parts in blocks.items():
        parts = [(name, table) for name, table in parts if table]
        if not parts and figures[title] is None:
            continue
        sections.append(f"## {title}\n")
        for name, table in parts:
            sections.append(f"{name}:\n\n{table}")
        if figures[title] is not None:
            sections.append(f"![{title}]({figures[title].name})\n")
    page = long_context.write_page(groups, out)
    if page is not None:
        sections.append(f"## Long context\n\nEffective length, RULER-style scores by length "
                        f"and depth, loss against position: [{page.name}]({page.name})\n")
    if unfinished:
        sections.append("Not evaluated yet: " + ", ".join(str(r.dir) for r in unfinished) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(sections))
    return path
