"""The report's long-context page (``long_context.md``): effective length per setting, the
RULER-style suite's mean score per length and a length × depth heatmap per task, and
loss against position with the last-k perplexity, from eval.json's ``ruler`` and
``position_loss`` (``eval.ruler.*``, ``eval.position_loss``). Seeds pool as elsewhere
(mean ± half-range; heatmaps and curves show the mean)."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cope_megatron.report.runs import Run, gather, stat  # noqa: E402
from cope_megatron.report.tables import markdown_table  # noqa: E402

PAGE = "long_context.md"


def _keys(groups: dict[str, list[Run]], *path: str) -> list[str]:
    """The keys found at ``path`` in any run's report, lengths sorted as numbers."""
    found: list[str] = []
    for runs in groups.values():
        for run in runs:
            node = run.eval or {}
            for key in path:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            found += [k for k in node if k not in found]
    return sorted(found, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))


def _methods(groups: dict[str, list[Run]]) -> list[str]:
    return _keys(groups, "ruler", "average")


def _cell(values: list[float], na: bool) -> str:
    s = stat(values)
    return str(s) if s is not None else ("n/a" if na else "–")


def effective_table(groups: dict[str, list[Run]], method: str) -> str | None:
    """Effective length per setting: over all tasks, then per task."""
    columns = _keys(groups, "ruler", "effective_length", method)
    if not columns:
        return None
    rows = []
    for label, runs in groups.items():
        row = [label, str(len(runs))]
        for c in columns:
            results = [r.eval["ruler"]["effective_length"][method].get(c, {}) for r in runs
                       if r.eval and "ruler" in r.eval]
            row.append(_cell(gather(runs, "ruler", "effective_length", method, c, "length"),
                             any("status" in x for x in results)))
        rows.append(row)
    return markdown_table(["setting", "seeds", *columns], rows)


def average_table(groups: dict[str, list[Run]], method: str) -> str | None:
    """Mean score over tasks and depths per length (n/a: some task could not run there)."""
    columns = _keys(groups, "ruler", "average", method)
    if not columns:
        return None
    rows = [[label] + [_cell(gather(runs, "ruler", "average", method, c), True)
                       for c in columns] for label, runs in groups.items()]
    return markdown_table(["setting", *columns], rows)


def last_k_table(groups: dict[str, list[Run]]) -> str | None:
    columns = _keys(groups, "position_loss")
    if not columns:
        return None
    rows = [[label] + [_cell(gather(runs, "position_loss", c, "last_k_ppl"), True)
                       for c in columns] for label, runs in groups.items()]
    return markdown_table(["setting", *columns], rows)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(groups: dict[str, list[Run]], task: str, method: str, path: Path) -> Path | None:
    """Score by length (columns) and depth (rows), one panel per setting; blank where
    not applicable."""
    lengths = _keys(groups, "ruler", "tasks", task)
    depths = sorted({d for runs in groups.values() for r in runs if r.eval
                     for row in r.eval.get("ruler", {}).get("tasks", {}).get(task, {}).values()
                     for d in row.get("depths", {})})
    if not lengths or not depths:
        return None
    fig, axes = plt.subplots(1, len(groups), squeeze=False, layout="constrained",
                             figsize=(1.5 + (1.6 + 0.6 * len(lengths)) * len(groups),
                                      1.8 + 0.4 * len(depths)))
    for ax, (label, runs) in zip(axes[0], groups.items()):
        grid = [[(lambda v: statistics.fmean(v) if v else float("nan"))(
            gather(runs, "ruler", "tasks", task, n, "depths", d, method)) for n in lengths]
            for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths, rotation=45)
        ax.set_yticks(range(len(depths)), depths)
        ax.set(xlabel="length (tokens)", ylabel="depth", title=label)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=method)
    fig.suptitle(task)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def position_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    """Mean loss against position in the window, one panel per length."""
    lengths = _keys(groups, "position_loss")
    lengths = [n for n in lengths if any("loss" in (r.eval or {}).get("position_loss", {})
                                         .get(n, {}) for rs in groups.values() for r in rs)]
    if not lengths:
        return None
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.6), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for label, runs in groups.items():
            curves = [r.eval["position_loss"][n] for r in runs
                      if "loss" in (r.eval or {}).get("position_loss", {}).get(n, {})]
            if not curves:
                continue
            width = curves[0]["bin_width"]
            mean = [statistics.fmean(c["loss"][i] for c in curves)
                    for i in range(len(curves[0]["loss"]))]
            ax.plot([width * (i + 0.5) for i in range(len(mean))], mean, label=label)
        ax.set(xlabel="position in window", ylabel="mean loss", title=f"windows of {n}")
        ax.legend()
    return _save(fig, path)


def write_page(groups: dict[str, list[Run]], out: Path) -> Path | None:
    """Write ``long_context.md`` and its PNGs into ``out`` when any run has a suite or
    position-loss result; its path, else None."""
    methods, tasks = _methods(groups), _keys(groups, "ruler", "tasks")
    if not methods and not _keys(groups, "position_loss"):
        return None
    sections = ["# Long context\n"]
    for method in methods:
        sections += [f"## Effective length ({method})\n",
                     "The longest length scoring at least the threshold (eval.ruler); "
                     "n/a: no threshold (see eval.json).\n",
                     effective_table(groups, method) or "",
                     f"Mean score over tasks and depths ({method}):\n",
                     average_table(groups, method) or ""]
    if tasks:
        sections.append("## Score by length and depth\n")
        method = "greedy" if "greedy" in methods else methods[0]
        for task in tasks:
            png = heatmap(groups, task, method, out / f"ruler_{task}.png")
            if png is not None:
                sections.append(f"![{task}]({png.name})\n")
    last_k = last_k_table(groups)
    if last_k:
        sections += ["## Loss against position\n",
                     "Perplexity of the last k tokens of each window:\n", last_k]
        png = position_plot(groups, out / "loss_vs_position.png")
        if png is not None:
            sections.append(f"![loss against position]({png.name})\n")
    path = out / PAGE
    path.write_text("\n".join(s for s in sections if s))
    return path
