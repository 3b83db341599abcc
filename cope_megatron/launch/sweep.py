"""PE ablations in one command: a sweep spec becomes one run directory per point of its
axes, run one after another here or submitted to SLURM, and a second call picks up where
the first stopped.

    name: pe_ablation_cpu
    out: runs/sweeps/pe_ablation_cpu          # one directory per run under it
    base: [configs/demo.yaml]                 # config files, in order
    overrides: {train.steps: 30}              # shared by every run
    axes: {model.pe: [rope, cope], train.seed: [1, 2]}   # any config key; the product
    variants:                                 # more trained runs, each setting several keys,
      rope_ssmax: {model.pe: rope, pe.length_scale.type: learned}   # times the other axes
    evaluations:                              # evaluation-time variants, no training:
      yarn: {of: {model.pe: rope}, overrides: {pe.rope_scaling.type: yarn},
             variants: [rope_ssmax]}          # optional: these variants' runs as well
    nodes: 1                                  # per run (SLURM), and processes per node
    gpus_per_node: 1
    sbatch: [--time=04:00:00, --partition=gpu]           # extra sbatch arguments

Each run directory holds its resolved ``config.yaml`` (written once: a run that started
keeps its config even if the spec changes, with a warning), ``command.sh`` (how to run it
by hand), ``train.log`` and ``sweep.json`` (the sweep's record of it). A run is done when
its ``eval.json`` is from its last step.

An evaluation variant (``evaluations``: name -> the axis values of the trained runs it
applies to, ``of``, and its ``overrides``, such as RoPE scaling) is a run directory of its
own, ``<trained run>_<name>``, whose ``checkpoints`` is a link to its trained run's: it
runs ``eval`` with its config once that run is done (``eval.log``), and the report shows
it as its own row. Written here because no library we use runs a
grid of Megatron/DeepSpeed jobs and resumes it; SLURM does the queueing.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import ConfigError, dump_yaml, load_config, to_dict
from cope_megatron.startup import check

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"


@dataclass
class SweepSpec:
    name: str
    out: str
    base: list[str]
    axes: dict[str, list]
    overrides: dict = field(default_factory=dict)
    nodes: int = 1
    gpus_per_node: int = 1
    sbatch: list[str] = field(default_factory=list)
    evaluations: dict[str, dict] = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=dict)


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = set(SweepSpec.__dataclass_fields__)
    if unknown := sorted(set(raw) - known):
        raise ConfigError(f"{path}: unknown keys {unknown}; a sweep spec has {sorted(known)}")
    for key in ("name", "out", "base", "axes"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    if not isinstance(raw["axes"], dict) or not all(
            isinstance(v, list) and v for v in raw["axes"].values()):
        raise ConfigError(f"{path}: axes maps config keys to non-empty lists of values")
    for name, variant in (raw.get("variants") or {}).items():
        if not isinstance(variant, dict) or not variant:
            raise ConfigError(f"{path}: variants.{name} must map config keys to values")
    for name, variant in (raw.get("evaluations") or {}).items():
        if (not isinstance(variant, dict) or not {"of", "overrides"} <= set(variant)
                or not set(variant) <= {"of", "overrides", "variants"}
                or not set(variant["of"]) <= set(raw["axes"])
                or not set(variant.get("variants", [])) <= set(raw.get("variants") or {})):
            raise ConfigError(f"{path}: evaluations.{name} must be {{of: {{axis: value}}, "
                              "overrides: {key: value}}, with keys of axes in of, and "
                              "optionally variants: [names of variants]")
    return SweepSpec(**raw)


@dataclass
class Run:
    name: str
    dir: Path
    overrides: list[str]
    of: Run | None = None
    """The trained run whose checkpoint this one evaluates; None: a run that trains."""

    @property
    def command(self) -> str:
        return "train" if self.of is None else "eval"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.command}.log"

    @property
    def record_path(self) -> Path:
        return self.dir / "sweep.json"

    def record(self) -> dict:
        return json.loads(self.record_path.read_text()) if self.record_path.exists() else {}

    def write_record(self, **values) -> None:
        write_text_atomic(self.record_path, json.dumps(values))


def _value(v) -> str:
    """A spec value as a ``key=value`` override reads it back."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def runs(spec: SweepSpec) -> list[Run]:
    """One run per point of the axes' product, named by its values (``pe-rope_seed-1``),
    one per variant and point of the axes it does not set (``cope_ssmax_seed-1``), then
    one per evaluation variant and trained run it applies to (``..._yarn``): the axes
    runs whose values match its ``of``, and those of the variants it names that do."""
    keys = list(spec.axes)
    shared = [f"{k}={_value(v)}" for k, v in spec.overrides.items()]
    out, points, kinds = [], [], []  # per trained run: its values, its variant

    def add(name: str, kind: str | None, pairs) -> None:
        run_dir = Path(spec.out) / name
        point = {k: _value(v) for k, v in pairs}
        out.append(Run(name, run_dir, [*spec.base, *shared,
                                       *(f"{k}={v}" for k, v in point.items()),
                                       f"run.dir={run_dir}"]))
        points.append(point)
        kinds.append(kind)

    for values in itertools.product(*spec.axes.values()):
        add("_".join(f"{k.rsplit('.', 1)[-1]}-{_value(v)}" for k, v in zip(keys, values)),
            None, zip(keys, values))
    for variant, sets in spec.variants.items():
        rest = [k for k in keys if k not in sets]
        for values in itertools.product(*(spec.axes[k] for k in rest)):
            add("_".join([variant, *(f"{k.rsplit('.', 1)[-1]}-{_value(v)}"
                                     for k, v in zip(rest, values))]),
                variant, [*sets.items(), *zip(rest, values)])
    trained = list(out)
    for variant, spec_of in spec.evaluations.items():
        changes = [f"{k}={_value(v)}" for k, v in spec_of["overrides"].items()]
        named = spec_of.get("variants", [])
        matching = [(run, kind) for run, point, kind in zip(trained, points, kinds)
                    if all(point.get(k) == _value(v) for k, v in spec_of["of"].items())]
        if missed := sorted(set(named) - {kind for _, kind in matching}):
            raise ConfigError(f"evaluations.{variant}: variants {missed} have no run with "
                              f"{spec_of['of']}; name only variants it applies to")
        for run, kind in matching:
            if kind is None or kind in named:
                run_dir = Path(spec.out) / f"{run.name}_{variant}"
                out.append(Run(f"{run.name}_{variant}", run_dir,
                               [*run.overrides[:-1], *changes, f"run.dir={run_dir}"], of=run))
    return out


def command(spec: SweepSpec, run: Run) -> list[str]:
    """How the run trains (or evaluates) on one node: torchrun for several processes."""
    config = str(run.dir / "config.yaml")
    if spec.gpus_per_node == 1:
        return [sys.executable, "-m", "cope_megatron", run.command, config]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={spec.gpus_per_node}", "-m", "cope_megatron", run.command,
            config]


def sbatch_command(spec: SweepSpec, run: Run, after: str | None = None) -> list[str]:
    """``after``: a job that must end well first (an evaluation's trained run)."""
    # The batch script runs from a spool copy: --chdir gives it the checkout.
    return ["sbatch", "--parsable", f"--chdir={LAUNCH_DIR.parent}", f"--nodes={spec.nodes}",
            f"--gpus-per-node={spec.gpus_per_node}", f"--job-name={spec.name}-{run.name}",
            f"--output={run.dir}/slurm-%j.out", f"--export=ALL,COMMAND={run.command}",
            # A failed trained run cancels its evaluation (rather than leaving it pending
            # forever, which status would show as running); the next call resubmits both.
            *([f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []),
            *spec.sbatch,
            str(LAUNCH_DIR / "slurm.sbatch"), str(run.dir / "config.yaml")]


def _same_config(path: Path, cfg) -> bool:
    """Whether a run's written config is ``cfg``, read through today's schema: keys added
    since it was written take their defaults, so a newer checkout does not count as a
    change of spec."""
    try:
        return to_dict(load_config([str(path)])) == to_dict(cfg)
    except ConfigError:  # a key today's schema no longer has
        return False


def create(spec: SweepSpec) -> list[Run]:
    """Write every run's directory, config and command, once every config has passed the
    start-up check."""
    all_runs = runs(spec)
    world = spec.nodes * spec.gpus_per_node
    configs = [load_config(run.overrides) for run in all_runs]
    for cfg in configs:
        check(cfg, world)
    for run, cfg in zip(all_runs, configs, strict=True):
        run.dir.mkdir(parents=True, exist_ok=True)
        config = run.dir / "config.yaml"
        if config.exists() and not _same_config(config, cfg):
            print(f"[sweep] {run.name}: keeps its config.yaml, which differs from the spec "
                  "(delete the run directory to start it over)", file=sys.stderr)
        elif not config.exists():
            dump_yaml(cfg, config)
        link = run.dir / "checkpoints"
        if run.of is not None and not link.is_symlink():
            link.symlink_to(Path("..") / run.of.dir.name / "checkpoints",
                            target_is_directory=True)
        how = sbatch_command(spec, run) if spec.nodes > 1 else command(spec, run)
        write_text_atomic(run.dir / "command.sh", shlex.join(how) + "\n")
    return all_runs


def _steps(run: Run) -> int:
    return yaml.safe_load((run.dir / "config.yaml").read_text())["train"]["steps"]


def _last_error(log: Path) -> str:
    if not log.exists():
        return "no log"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["empty log"])[-1][:200]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _slurm_state(job: str) -> str:
    """The job's state in squeue ('' once it has left the queue)."""
    if shutil.which("squeue") is None:
        return ""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                         text=True)
    return out.stdout.strip()


def status(run: Run) -> tuple[str, str]:
    """(done | running | failed | pending, detail)."""
    eval_json = run.dir / "eval.json"
    if eval_json.exists() and json.loads(eval_json.read_text()).get("step") == _steps(run):
        return "done", ""
    record = run.record()
    if record.get("pid") and _alive(record["pid"]):
        return "running", f"pid {record['pid']}"
    if record.get("job"):
        state = _slurm_state(record["job"])
        if state:
            return "running", f"SLURM job {record['job']} {state.lower()}"
        return "failed", _last_error(run.dir / f"slurm-{record['job']}.out")
    if record.get("state") == "failed" or record.get("pid"):
        return "failed", record.get("error") or _last_error(run.log)
    return "pending", ""


def run_local(spec: SweepSpec, all_runs: list[Run]) -> None:
    """Train every run that is not done or running, one after another, then evaluate each
    evaluation variant whose trained run is done; a failure is recorded and the next run
    starts."""
    if spec.nodes > 1:
        raise ConfigError(f"sweep {spec.name}: its runs span {spec.nodes} nodes; submit them "
                          "with --run slurm (or set nodes: 1)")
    for run in all_runs:
        state, _ = status(run)
        if state in ("done", "running"):
            print(f"[sweep] {run.name}: {state}, skipped", file=sys.stderr)
            continue
        if run.of is not None and status(run.of)[0] != "done":
            print(f"[sweep] {run.name}: waits for {run.of.name}", file=sys.stderr)
            continue
        doing = "training" if run.of is None else "evaluating"
        print(f"[sweep] {run.name}: {doing}", file=sys.stderr, flush=True)
        with open(run.log, "a") as log:
            proc = subprocess.Popen(command(spec, run), stdout=log, stderr=subprocess.STDOUT)
            run.write_record(state="running", pid=proc.pid)
            code = proc.wait()
        if code == 0 and status(run)[0] == "done":
            run.write_record(state="done")
        else:
            run.write_record(state="failed", error=_last_error(run.log))
            print(f"[sweep] {run.name}: failed (exit {code}): "
                  f"{run.record()['error']}", file=sys.stderr)


def submit_slurm(spec: SweepSpec, all_runs: list[Run]) -> None:
    """sbatch every run that is not done or running; each job resumes from its own
    checkpoint when requeued. An evaluation variant waits for its trained run's job (or
    for a later call, when that run has failed)."""
    for run in all_runs:
        state, _ = status(run)
        if state in ("done", "running"):
            continue
        after = None
        if run.of is not None:
            trained, _ = status(run.of)
            after = run.of.record().get("job") if trained == "running" else None
            if trained != "done" and after is None:
                print(f"[sweep] {run.name}: waits for {run.of.name}", file=sys.stderr)
                continue
        out = subprocess.run(sbatch_command(spec, run, after), capture_output=True, text=True,
                             env={**os.environ, "NGPU": str(spec.gpus_per_node)})
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed for {run.name}: {out.stderr.strip()}")
        job = out.stdout.strip().split(";")[0]
        run.write_record(state="submitted", job=job)
        print(f"[sweep] {run.name}: submitted as job {job}", file=sys.stderr)


def status_table(all_runs: list[Run]) -> str:
    rows = [(run.name, *status(run)) for run in all_runs]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'run':<{width}}  {'status':<8}  detail"]
    lines += [f"{name:<{width}}  {state:<8}  {detail}" for name, state, detail in rows]
    counts = {s: sum(r[1] == s for r in rows) for s in ("done", "running", "failed", "pending")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)
