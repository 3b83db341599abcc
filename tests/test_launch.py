"""The launch scripts and sweeps, on CPU with gloo on localhost: two simulated nodes
against one process, SLURM under a fake SLURM (shims for srun, scontrol, sbatch), the
hostfile launcher's dry run, and a sweep with a planted failure."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cope_megatron.cli import main as cli
from cope_megatron.config import ConfigError
from tests.helpers import debug_overrides, free_port, losses, train_losses

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def script_env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), **extra}


def start_nodes(args_per_node: list[list[str]], per_node: int = 2,
                grace: float = 60.0) -> list[tuple[str, int]]:
    """launch/multinode.sh once per node (``per_node`` processes each) on 127.0.0.1, node i
    with ``args_per_node[i]``: (output, exit code) of each. Once a node has failed, the
    others get ``grace`` seconds to end too before they are killed: a node whose peer
    never came up would otherwise wait out torchrun's 600-s rendezvous."""
    port = str(free_port())
    logs = [tempfile.TemporaryFile("w+") for _ in args_per_node]
    nodes = [subprocess.Popen(
        ["bash", str(LAUNCH / "multinode.sh"), *args], cwd=ROOT, text=True,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=script_env(NNODES=str(len(args_per_node)), NODE_RANK=str(rank), NGPU=str(per_node),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for rank, (args, log) in enumerate(zip(args_per_node, logs))]
    deadline, failed_at = time.monotonic() + 600, None
    while any(node.poll() is None for node in nodes):
        if failed_at is None and any(node.returncode for node in nodes):
            failed_at = time.monotonic()
        if time.monotonic() > min(deadline, (failed_at or deadline) + grace):
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)  # the agent and its workers
                    node.wait()
        time.sleep(0.2)
    results = []
    for node, log in zip(nodes, logs):
        log.seek(0)
        results.append((log.read(), node.returncode))
        log.close()
    return results


@pytest.mark.integration
def test_two_simulated_nodes_match_one_process(prepared, tmp_path):
    """Two launch/multinode.sh processes (nodes 0 and 1 on 127.0.0.1), 2 processes each:
    TP=2 within a node, DP=2 across nodes; the losses of one process with the same global
    batch (2 accumulation steps)."""
    shards, _, _ = prepared
    want = train_losses(shards, tmp_path / "one", 1, 3, **{
        "train.micro_batch_size": 2, "train.grad_accum": 2, "data.shuffle_buffer": 8})
    args = debug_overrides(shards, tmp_path / "two_nodes", **{
        "train.steps": 3, "data.streams": 2, "train.micro_batch_size": 2,
        "data.shuffle_buffer": 8, "parallel.tensor": 2})
    (out0, code0), (out1, code1) = start_nodes([args, args])
    assert (code0, code1) == (0, 0), out0[-3000:] + out1[-3000:]
    got = losses(tmp_path / "two_nodes")
    assert len(got) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(got, want)), (got, want)


@pytest.mark.integration
def test_nodes_with_different_configs_refuse_to_train(prepared, tmp_path):
    shards, _, _ = prepared
    args = debug_overrides(shards, tmp_path / "run", **{"parallel.tensor": 2})
    results = start_nodes([args, [*args, "train.lr=0.01"]], per_node=1)
    for out, code in results:  # each node refused on its own, none was killed
        assert code not in (0, -9), out
        assert "run config or data manifest differ between nodes" in out, out
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_a_node_whose_node_0_never_comes_up_gives_up(prepared, tmp_path):
    """Node 1 alone (node 0 refused, or never started): its torchrun waits RDZV_TIMEOUT
    seconds for node 0's store, then exits non-zero saying so, instead of torchrun's 600."""
    shards, _, _ = prepared
    args = debug_overrides(shards, tmp_path / "run")
    start = time.monotonic()
    node = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env=script_env(NNODES="2", NODE_RANK="1", NGPU="1", RDZV_TIMEOUT="5",
                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert node.returncode != 0
    assert "timed out after 5000ms while trying to connect" in node.stderr
    assert time.monotonic() - start < 240  # start-up (imports) and the 5 s, not 600 s
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_launchers_check_the_layout_and_dry_run_prints_config_and_command(prepared,
                                                                          tmp_path):
    shards, _, _ = prepared
    args = debug_overrides(shards, tmp_path / "run", **{"parallel.tensor": 2})
    dry = subprocess.run(["bash", str(LAUNCH / "train.sh"), *args], cwd=ROOT, text=True,
                         capture_output=True, env=script_env(NGPU="4", DRY_RUN="1"))
    assert dry.returncode == 0, dry.stderr
    config = yaml.safe_load(dry.stdout.rsplit("\n", 2)[0])
    assert config["parallel"]["tensor"] == 2 and config["run"]["dir"] == str(tmp_path / "run")
    assert "--nproc-per-node 4 -m cope_megatron train" in dry.stdout
    assert "world 4 = TP 2 x CP 1 x DP 2" in dry.stderr
    assert not (tmp_path / "run").exists()  # nothing started
    bad = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), *args], cwd=ROOT, text=True,
                         capture_output=True,
                         env=script_env(NGPU="3", NNODES="1", NODE_RANK="0",
                                        MASTER_ADDR="127.0.0.1", DRY_RUN="1"))
    assert bad.returncode == 2
    assert "parallel.tensor: world size 3 is not a multiple" in bad.stderr


@pytest.mark.integration
def test_hostfile_dry_run_names_every_host_and_slot(prepared, tmp_path):
    shards, _, _ = prepared
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\ngpu-a slots=2\ngpu-b slots=2\n")
    args = debug_overrides(shards, tmp_path / "run", **{"parallel.tensor": 2})
    out = subprocess.run(["bash", str(LAUNCH / "deepspeed_hostfile.sh"), *args], cwd=ROOT,
                         text=True, capture_output=True,
                         env=script_env(HOSTFILE=str(hostfile), DRY_RUN="1"))
    assert out.returncode == 0, out.stderr
    assert "host gpu-a: slots 0-1" in out.stdout and "host gpu-b: slots 0-1" in out.stdout
    assert f"deepspeed --hostfile {hostfile} --no_local_rank --module cope_megatron train" \
        in out.stdout
    assert "world 4 = TP 2 x CP 1 x DP 2" in out.stderr
    hostfile.write_text("gpu-a 2\n")
    bad = subprocess.run(["bash", str(LAUNCH / "deepspeed_hostfile.sh"), *args], cwd=ROOT,
                         text=True, capture_output=True,
                         env=script_env(HOSTFILE=str(hostfile), DRY_RUN="1"))
    assert bad.returncode == 2 and "is not 'host slots=N'" in bad.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: records the command each node would run; FAKE_SRUN_BLOCK: then waits for a
# signal, like a running job step, and records it.
for node in $(seq 0 $((SLURM_NNODES - 1))); do echo "node $node: $*" >> "$FAKE_LOG"; done
if [ -n "${FAKE_SRUN_BLOCK:-}" ]; then
  trap 'echo "srun got TERM" >> "$FAKE_LOG"; exit 143' TERM
  while true; do sleep 0.1; done
fi
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo "$3" | tr ',' '\\n' ;;
  requeue) echo "requeue $2" >> "$FAKE_LOG" ;;
esac
"""
FAKE_SBATCH = """#!/usr/bin/env bash
echo "sbatch $*" >> "$FAKE_LOG"; echo "77$RANDOM"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = script_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                     SLURM_NNODES="2", SLURM_JOB_NODELIST="node001,node002",
                     SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="2")
    return env, log


@pytest.mark.integration
def test_slurm_script_runs_torchrun_on_every_node_and_requeues_on_signal(prepared, tmp_path,
                                                                          fake_slurm):
    env, log = fake_slurm
    shards, _, _ = prepared
    args = debug_overrides(shards, tmp_path / "run", **{"parallel.tensor": 2})
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=tmp_path,
                         text=True, capture_output=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = log.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["node 0", "node 1"]
    for line in lines:
        assert (f"--kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run --nnodes 2 "
                "--nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node001:29500 "
                "--rdzv-id 4242 -m cope_megatron train") in line
        assert line.endswith(" ".join(args))

    # The time-limit warning (USR1 to the batch script): the job step is told to stop
    # (TERM, which the trainer answers with a checkpoint), then the job is requeued.
    log.unlink()
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=tmp_path,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**env, "FAKE_SRUN_BLOCK": "1"})
    deadline = time.monotonic() + 60
    while not (log.exists() and "node 1" in log.read_text()):
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    assert log.read_text().splitlines()[-2:] == ["srun got TERM", "requeue 4242"]
    assert "time limit near (USR1)" in stdout


def write_spec(tmp_path, shards) -> Path:
    overrides = dict(o.split("=", 1) for o in debug_overrides(shards, "unused"))
    del overrides["run.dir"]
    overrides["train.steps"] = 3
    spec = {"name": "tiny_sweep", "out": str(tmp_path / "sweep"), "base": [],
            "overrides": overrides, "axes": {"model.pe": ["rope", "cope"], "train.seed": [2]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(capsys, *args: str) -> tuple[int, str, str]:
    """``cope-megatron sweep ARGS`` in this process (its runs train in their own): exit
    code, stdout, stderr."""
    capsys.readouterr()
    code = cli(["sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
def test_sweep_runs_skips_finished_and_reports_failures(prepared, tmp_path, fake_slurm,
                                                      capsys, monkeypatch):
    """2 PEs of the debug model; one run's config is planted broken after creation: it
    fails with its error in the status table, the other finishes, and a second call skips
    it and retries only the failed one."""
    shards, _, _ = prepared
    spec = write_spec(tmp_path, shards)
    code, created, err = sweep(capsys, str(spec))
    assert code == 0, err
    names = ["pe-rope_seed-2", "pe-cope_seed-2"]
    runs = tmp_path / "sweep"
    assert sorted(p.name for p in runs.iterdir()) == sorted(names)
    assert "2 pending" in created
    config = yaml.safe_load((runs / "pe-cope_seed-2" / "config.yaml").read_text())
    assert config["model"]["pe"] == "cope" and config["train"]["seed"] == 2
    assert config["run"]["dir"] == str(runs / "pe-cope_seed-2")

    planted = runs / "pe-rope_seed-2" / "config.yaml"
    broken = yaml.safe_load(planted.read_text())
    broken["data"]["shards"] = str(tmp_path / "missing")
    planted.write_text(yaml.safe_dump(broken))
    code, _, first = sweep(capsys, str(spec), "--run", "local")
    assert code == 0, first
    table = sweep(capsys, "status", str(spec))[1]
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in table.splitlines()[1:-1]}
    assert rows["pe-rope_seed-2"][0] == "failed"
    assert "data.shards: no manifest" in rows["pe-rope_seed-2"][1]
    assert all(rows[n][0] == "done" for n in names if n != "pe-rope_seed-2"), table
    assert table.splitlines()[-1] == "1 done, 1 failed"
    assert "keeps its config.yaml" in first  # the planted change is not overwritten

    finished = {n: (runs / n / "eval.json").stat().st_mtime for n in names
                if n != "pe-rope_seed-2"}
    code, _, second = sweep(capsys, str(spec), "--run", "local")
    assert code == 0, second
    assert second.count("done, skipped") == 1
    assert "pe-rope_seed-2: training" in second
    assert {n: (runs / n / "eval.json").stat().st_mtime for n in finished} == finished

    code, _, err = sweep(capsys, "report", str(spec))
    assert code == 0, err
    assert (runs / "report" / "report.md").exists()

    # --run slurm submits only what is not done, each with its own config and log.
    env, log = fake_slurm
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, _, err = sweep(capsys, str(spec), "--run", "slurm")
    assert code == 0, err
    (line,) = log.read_text().splitlines()
    assert "--job-name=tiny_sweep-pe-rope_seed-2" in line
    assert line.endswith(f"slurm.sbatch {planted}")
    assert json.loads((runs / "pe-rope_seed-2" / "sweep.json").read_text())["job"]


def test_sweep_variants_set_several_keys_and_cross_the_other_axes(tmp_path):
    from cope_megatron.launch.sweep import load_spec, runs

    path = tmp_path / "spec.yaml"
    path.write_text("name: s\nout: out\nbase: [configs/demo.yaml]\n"
                    "axes: {model.pe: [rope], train.seed: [1, 2]}\n"
                    "variants: {cope_ssmax: {model.pe: cope, pe.length_scale.type: learned}}\n"
                    "evaluations: {yarn: {of: {model.pe: rope}, "
                    "overrides: {pe.rope_scaling.type: yarn}}}\n")
    got = {run.name: run.overrides for run in runs(load_spec(path))}
    assert list(got) == ["pe-rope_seed-1", "pe-rope_seed-2", "cope_ssmax_seed-1",
                         "cope_ssmax_seed-2", "pe-rope_seed-1_yarn", "pe-rope_seed-2_yarn"]
    assert got["cope_ssmax_seed-2"] == ["configs/demo.yaml", "model.pe=cope",
                                        "pe.length_scale.type=learned", "train.seed=2",
                                        "run.dir=out/cope_ssmax_seed-2"]
    # An evaluation covers the runs of the variants it names too, where they match its of.
    path.write_text("name: s\nout: out\nbase: [configs/tasks/niah_single.yaml]\n"
                    "axes: {model.pe: [rope, alibi], train.seed: [1]}\n"
                    "variants: {vt: {task.name: vt}, rope_ssmax: {model.pe: rope}}\n"
                    "evaluations: {yarn: {of: {model.pe: rope}, variants: [vt], "
                    "overrides: {pe.rope_scaling.type: yarn}}}\n")
    evaluated = [run.name for run in runs(load_spec(path)) if run.of is not None]
    assert evaluated == ["pe-rope_seed-1_yarn", "vt_pe-rope_seed-1_yarn"]
    path.write_text(path.read_text().replace("variants: [vt]", "variants: [vt, rope_ssmax]")
                    .replace("rope_ssmax: {model.pe: rope}", "rope_ssmax: {model.pe: alibi}"))
    with pytest.raises(ConfigError, match=r"evaluations.yarn: variants \['rope_ssmax'\]"):
        runs(load_spec(path))
    path.write_text("name: s\nout: out\nbase: []\naxes: {train.seed: [1]}\n"
                    "evaluations: {e: {of: {}, overrides: {}, variants: [nope]}}\n")
    with pytest.raises(ConfigError, match="evaluations.e must be"):
        load_spec(path)
    path.write_text("name: s\nout: out\nbase: []\naxes: {train.seed: [1]}\nvariants: {x: 3}\n")
    with pytest.raises(ConfigError, match="variants.x must map config keys to values"):
        load_spec(path)


def test_a_run_written_before_a_key_existed_keeps_matching_its_spec(tmp_path):
    """A run's config.yaml from an older checkout lacks the keys added since: read through
    today's schema they take their defaults, so the sweep does not call it changed."""
    from cope_megatron.config import load_config, to_dict
    from cope_megatron.launch.sweep import _same_config

    cfg = load_config(["configs/demo.yaml"])
    written = to_dict(cfg)
    del written["data"]["join_rows"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(written))
    assert _same_config(path, cfg)
    written["train"]["steps"] += 1
    path.write_text(yaml.safe_dump(written))
    assert not _same_config(path, cfg)
    written["train"]["steps"] -= 1
    written["data"]["retired_key"] = 1
    path.write_text(yaml.safe_dump(written))
    assert not _same_config(path, cfg)
