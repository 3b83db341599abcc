"""Finished runs read back from their directories, grouped by what they compare.

A run directory holds ``config.yaml``, ``metrics.jsonl`` and ``eval.json`` (written by
``train`` and ``eval``). Runs are grouped by label (``run.name`` when set, else the PE
as its evaluation names it, ``pe.label``: ``rope+yarn×8``, ``cope+ssmax``); runs that
share a label are seeds of one setting, shown as their mean with the range across seeds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from cope_megatron import pe
from cope_megatron.config import load_config
from cope_megatron.errors import UserError


class ReportError(UserError, ValueError):
    """A run directory that cannot be reported; the message names it."""


@dataclass(frozen=True)
class Run:
    dir: Path
    label: str
    config: dict
    metrics: list[dict]
    eval: dict | None
    """None while the run has no evaluation yet."""


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no config.yaml); pass "
                          "directories written by `cope-megatron train`")
    config = yaml.safe_load(config_path.read_text())
    metrics_path = run_dir / "metrics.jsonl"
    records = ([json.loads(line) for line in metrics_path.read_text().splitlines() if line]
               if metrics_path.is_file() else [])
    metrics = [r for r in records if "loss" in r]  # steps, not events (a config change)
    eval_path = run_dir / "eval.json"
    report = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    label = config["run"].get("name") or (report or {}).get("pe") or pe.label(
        load_config([str(config_path)]))
    return Run(run_dir, label, config, metrics, report)


def by_task(runs: list[Run]) -> list[Run]:
    """``runs``, each labelled with its task as well when they train on several (a sweep's
    task variants): runs of one PE on different tasks are not seeds of one setting."""
    tasks = {(run.config.get("task") or {}).get("name") for run in runs}
    if len(tasks) < 2:
        return runs
    return [replace(run, label=f"{(run.config.get('task') or {}).get('name') or 'lm'}: "
                               f"{run.label}") for run in runs]


def group(runs: list[Run]) -> dict[str, list[Run]]:
    """Label -> its runs, in the order labels first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


@dataclass(frozen=True)
class Stat:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        def show(x: float, digits: int) -> str:
            return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"

        if self.high == self.low:
            return show(self.mean, 4)
        return f"{show(self.mean, 4)} ± {show((self.high - self.low) / 2, 2)}"


def stat(values: list[float]) -> Stat | None:
    """Mean and range of the values a setting's seeds gave; None when none did."""
    if not values:
        return None
    return Stat(statistics.fmean(values), min(values), max(values), len(values))


def passkey_means(runs: list[Run], length: str) -> list[float]:
    """Each run's passkey accuracy at ``length``, averaged over depths (runs where it was
    not applicable give none)."""
    out = []
    for run in runs:
        result = (run.eval or {}).get("passkey", {}).get(length, {})
        depths = [v for k, v in result.items() if k not in ("samples", "status", "reason")]
        if depths:
            out.append(statistics.fmean(depths))
    return out


def gather(runs: list[Run], *path: str) -> list[float]:
    """The value at ``path`` of each run's eval report, where it holds a number."""
    out = []
    for run in runs:
        node = run.eval
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            out.append(float(node))
    return out
