"""The report's figures, one PNG each, with matplotlib's non-interactive backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cope_megatron.report.runs import Run, gather, passkey_means, stat  # noqa: E402
from cope_megatron.report.tables import lengths, task_splits  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _length_axis(ax, xs: list[str]) -> None:
    """Log-scale length axis ticked at the evaluated lengths."""
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(x) for x in xs], xs)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _series(runs: list[Run], xs: list[str], path_of) -> tuple[list[int], list, list, list]:
    found = [(int(x), stat(gather(runs, *path_of(x)))) for x in xs]
    found = [(x, s) for x, s in found if s is not None]
    return ([x for x, _ in found], [s.mean for _, s in found], [s.low for _, s in found],
            [s.high for _, s in found])


def perplexity_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    """Perplexity against evaluation length, both protocols, log-scale length axis."""
    panels = [(p, title) for p, title in (("lengths", "non-overlapping windows"),
                                         ("sliding", "sliding window"))
              if lengths(groups, p)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (protocol, title) in zip(axes[0], panels):
        xs = lengths(groups, protocol)
        for label, runs in groups.items():
            x, mean, low, high = _series(runs, xs, lambda c, p=protocol: (p, c, "ppl"))
            if x:
                ax.plot(x, mean, marker="o", label=label)
                ax.fill_between(x, low, high, alpha=0.2)
        train = {r.eval["train_length"] for rs in groups.values() for r in rs
                 if r.eval and "train_length" in r.eval}
        for t in train:
            ax.axvline(t, color="grey", lw=0.8, ls=":")
        ax.set(yscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity",
               title=title)
        _length_axis(ax, xs)
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend()
    return _save(fig, path)


def passkey_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    xs = lengths(groups, "passkey")
    if not xs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, runs in groups.items():
        means = {x: passkey_means(runs, x) for x in xs}
        points = [(int(x), stat(m).mean) for x, m in means.items() if m]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(ylim=(-0.05, 1.05), xlabel="context length (tokens)",
           ylabel="passkey accuracy (mean over depths)", title="passkey retrieval")
    _length_axis(ax, xs)
    ax.legend()
    return _save(fig, path)


def task_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    """Error % per test split (in distribution, then out of it), bars per setting."""
    splits = task_splits(groups)
    if not splits:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(splits) * max(1, len(groups)) / 3, 4.2))
    width = 0.8 / max(1, len(groups))
    for i, (label, runs) in enumerate(groups.items()):
        stats = [stat(gather(runs, "splits", s, "error_pct")) for s in splits]
        x = np.arange(len(splits)) + (i - (len(groups) - 1) / 2) * width
        mean = [s.mean if s else np.nan for s in stats]
        err = [[s.mean - s.low if s else 0 for s in stats], [s.high - s.mean if s else 0
                                                             for s in stats]]
        ax.bar(x, mean, width, yerr=err, label=label, capsize=2)
    ax.set_xticks(np.arange(len(splits)), splits)
    ax.set(ylabel="error % (answer tokens)", ylim=(0, 100), title="task error")
    ax.legend()
    return _save(fig, path)


def loss_plot(groups: dict[str, list[Run]], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    drawn = False
    for label, runs in groups.items():
        for k, run in enumerate(runs):
            if run.metrics:
                steps = [m["step"] for m in run.metrics]
                ax.plot(steps, [m["loss"] for m in run.metrics], lw=1,
                        color=f"C{list(groups).index(label)}", label=label if k == 0 else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    ax.legend()
    return _save(fig, path)
