"""Downstream tasks through lm-evaluation-harness, on the run exported as a Hugging Face
model (``export``) and read by the harness's own ``hf`` backend, so scores are the ones
anyone gets from the shared checkpoint. Results go to ``harness.json`` beside the run's
``eval.json``; ``report`` tabulates them.

Local task files work offline: a directory of task YAMLs (``eval.harness_include``) whose
``dataset_path: json`` reads a local file. Tasks from the harness's registry download
their datasets from the Hugging Face Hub; offline, that fails with a message saying so.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.errors import UserError
from cope_megatron.hf.export import MARKER, export

HARNESS_FILE = "harness.json"


class HarnessError(UserError, RuntimeError):
    """A harness task that cannot run; the message says which and what to do."""


def exported(run_dir: Path, step: int) -> Path:
    """The run's export for ``step``, made (again) when missing or older."""
    out = run_dir / "hf"
    info = out / MARKER
    if not info.is_file() or json.loads(info.read_text()).get("step") != step:
        export(run_dir, out)
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None):
    """The harness's task index (it reads every task YAML it ships: seconds), once per
    process for ``check_tasks`` and ``run_harness``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)


def check_tasks(tasks: list[str], include: str | None = None) -> None:
    """Raise HarnessError unless every one of ``tasks`` is a harness task (from its registry
    or ``include``): called before evaluation starts, so a typo costs no evaluation."""
    unknown = [t for t in tasks if t not in _task_manager(include).all_tasks]
    if unknown:
        where = f" or in {include}" if include else " (eval.harness_include adds local ones)"
        raise HarnessError(f"eval.harness_tasks: {unknown} are not lm-evaluation-harness "
                           f"tasks{where}")


def run_harness(run_dir: str | Path, step: int, tasks: list[str], *,
                include: str | None = None, limit: int | None = None,
                batch_size: int = 8, device: str = "cpu", max_length: int | None = None,
                lm=None) -> dict:
    """Run ``tasks`` on the run's model at ``step``, its export read by the harness's
    ``hf`` backend, or ``lm`` (an ``lm_eval`` LM, e.g. ``eval.harness_native``'s); write
    and return {"step", "tasks": {task: {metric: value}}}."""
    import lm_eval

    check_tasks(tasks, include)
    run_dir = Path(run_dir)
    manager = _task_manager(include)
    if lm is None:
        model_args = (f"pretrained={exported(run_dir, step)},trust_remote_code=True,"
                      "dtype=float32" + (f",max_length={max_length}" if max_length else ""))
        model = {"model": "hf", "model_args": model_args, "batch_size": batch_size,
                 "device": device}
    else:
        model = {"model": lm}
    try:
        out = lm_eval.simple_evaluate(**model, tasks=tasks, task_manager=manager,
                                      limit=limit)
    except (ConnectionError, OSError) as e:  # datasets' offline and hub errors
        raise HarnessError(
            f"eval.harness_tasks {tasks}: a task's dataset could not be loaded ({e}). Tasks "
            "from the harness's registry download from the Hugging Face Hub: run once "
            "online, or point eval.harness_include at local task YAMLs with local data"
        ) from e
    scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
              for task, metrics in out["results"].items()}
    result = {"step": step, "tasks": scores}
    write_text_atomic(run_dir / HARNESS_FILE, json.dumps(result, indent=1))
    return result
