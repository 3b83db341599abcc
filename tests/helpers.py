"""What several test modules share: the synthetic corpus, debug-run overrides, reading a
run's metrics, starting ranks, and the CoPE op's device paths.

Multi-rank runs start as forks of one server process that has imported torch, DeepSpeed
and Megatron-Core once (``multiprocessing``'s forkserver, preloaded): a torchrun launch
spends about 6 s per rank importing them before it checks anything, which made process
starts most of the suite's time. Forking pytest itself would be cheaper still but is not
safe: after a test has run a gloo process group in it, a forked child crashes creating
its own. The ranks see what torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR, ...), so
the code under test takes its torchrun path; the launchers themselves (torchrun, the
launch scripts, the CLI as a process) keep their own tests in test_launch, test_train,
test_export and test_eval. Forking is for the CPU only: a CUDA context does not survive
it, so on a GPU the layout tests run torchrun.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from cope_megatron.ops.cope import paths as cope_paths

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the of and to in is was that for it with as his on be at by had not are but from "
         "or have an they which one you were her all she there would their we him been has when "
         "who will more no if out so said what up its about into than them can only other new "
         "some could time these two may then do first any my now such like our over man me even "
         "most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right "
         "used take three").split()


def write_corpus(root: Path, docs: int = 12, words_per_doc: int = 3000,
                 seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(docs):
        lines = []
        for _ in range(words_per_doc // 12):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
        path = root / f"doc{d:03d}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def small_data(root: Path, **changes):
    """The data section used by the session data set (``changes`` override fields)."""
    from cope_megatron.config import DataConfig

    fields = {"corpus": [str(root / "corpus")], "shards": str(root / "shards"),
              "cache_dir": str(root / "cache"), "vocab_size": 512, "val_fraction": 0.25,
              "shard_max_bytes": 20_000, "prep_workers": 2, **changes}
    return DataConfig(**fields)


def debug_overrides(shards, run_dir, **extra) -> list[str]:
    """Config sources for a debug-sized run on the session data set."""
    base = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
        "model.seq_length": 32, "data.shards": str(shards), "train.micro_batch_size": 4,
        "train.steps": 6, "train.warmup_steps": 1, "train.lr": 3e-3, "train.min_lr": 3e-3,
        "run.dir": str(run_dir), "logging.wandb": "disabled", "logging.progress": False,
        "eval.tokens": 256, "eval.batch_size": 2, "eval.length_multipliers": "[1, 2]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    """The step records (a resume with changed settings adds a config_change record)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def losses(run_dir: Path) -> list[float]:
    """The logged loss of every step of the run in ``run_dir``."""
    return [r["loss"] for r in read_metrics(run_dir)]


def train_here(shards, run_dir: Path, **extra):
    """One debug run in this process (``debug_overrides`` plus ``extra``, no final
    evaluation), its process groups torn down after; the TrainResult."""
    from cope_megatron.config import load_config
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.train import run_train

    try:
        return run_train(load_config(debug_overrides(shards, run_dir, **extra)),
                         evaluate_after=False)[0]
    finally:
        destroy_distributed()


def nan_loss_at(steps: set[int], loss_sum: Callable) -> Callable:
    """``loss_sum`` (the trainer's) made NaN at its calls ``steps`` (1-based; one micro
    batch per step, so call k is step k)."""
    calls = [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = loss_sum(*args, **kwargs)
        return loss * float("nan") if calls[0] in steps else loss

    return poisoned


def wait_for_steps(proc, run_dir: Path, steps: int, timeout: float = 300) -> None:
    """Until ``run_dir`` has logged ``steps`` steps; fails if ``proc`` (a Popen or a forked
    Process) ends or stalls first."""
    import time

    running = proc.is_alive if hasattr(proc, "is_alive") else lambda: proc.poll() is None
    deadline, metrics = time.time() + timeout, run_dir / "metrics.jsonl"
    while time.time() < deadline and running():
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {steps}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range. The OS hands out ports from that
    range on its own (bind to port 0, every outgoing connection's source port), so a port
    taken from it may go to another process's gloo connection before our server binds it;
    torchrun's node 0 then cannot start, and the other nodes' agents wait out their
    600-s rendezvous with no worker (seen once in three suites under pytest-xdist)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} after 200 tries")


def _rank_main(rank: int, world: int, port: int, log: str, target: Callable, args: tuple):
    """A forked rank: torchrun's environment, one thread, output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    faulthandler.enable(sys.stderr)  # a crash in C code leaves its Python stack in the log
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1, read before this process began
    try:
        code = target(*args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


_SERVER = multiprocessing.get_context("forkserver")
PRELOAD = ["cope_megatron.data.loader", "cope_megatron.cli", "cope_megatron.train",
           "tests.helpers", "tests.parallel_worker"]
"""What the server imports before it forks anything. A process has one forkserver, which
the data loader's workers share (``data/loader.py`` names its own module)."""


def start_fork_server() -> None:
    """Start the server now (conftest: while pytest collects), preloading ``PRELOAD``;
    the first process forked waits until it is ready."""
    _SERVER.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()


def fork(target: Callable, *args, log: str | Path, rank: int = 0, world: int = 1,
         port: int | None = None) -> multiprocessing.Process:
    """Start ``target(*args)`` (a module-level function) as rank ``rank`` of ``world`` in a
    process forked from the preloaded server, its output in ``log``; an int it returns is
    its exit code."""
    proc = _SERVER.Process(target=_rank_main,
                           args=(rank, world, port or free_port(), str(log), target, args))
    proc.start()
    return proc


def forked_ranks(world: int, target: Callable, *args, timeout: float = 600) -> list[str]:
    """Run ``target(*args)`` on ``world`` ranks forked from this process, as torchrun would
    start them on one node. Fails with every rank's output tail unless all exit 0;
    returns their outputs."""
    import tempfile

    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        paths = [os.path.join(logs, f"rank{r}.log") for r in range(world)]
        procs = [fork(target, *args, log=paths[r], rank=r, world=world, port=port)
                 for r in range(world)]
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
        outputs = [Path(p).read_text(errors="replace") for p in paths]
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, "\n".join(
        f"--- rank {r} exit {c}:\n{out[-3000:]}" for r, (c, out) in
        enumerate(zip(codes, outputs)))
    return outputs


def cli_in_ranks(world: int, argv: list[str]) -> list[str]:
    """``cope-megatron ARGV`` on ``world`` forked ranks (``torchrun --nproc-per-node
    WORLD -m cope_megatron ARGV``, without the start-up)."""
    from cope_megatron.cli import main

    return forked_ranks(world, main, argv)


def train_losses(shards, run_dir: Path, procs: int, steps: int, **extra) -> list[float]:
    """Train the debug model on ``procs`` ranks; the logged losses."""
    args = debug_overrides(shards, run_dir, **{"train.steps": steps, "data.streams": 2,
                                               **extra})
    cli_in_ranks(procs, ["train", *args])
    return losses(run_dir)


def torchrun(world: int, args: list[str], timeout: float = 1200) -> None:
    """``torchrun --standalone --nproc-per-node WORLD ARGS`` as a real launch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def local_rows(cp, t: torch.Tensor) -> torch.Tensor:
    """This context-parallel rank's head and tail chunks (``cp``: an
    ``ops.context_parallel.ring.ContextParallel``) of a full [b, h, S, ...] tensor."""
    c = t.shape[2] // (2 * cp.size)
    return torch.cat([t[:, :, i * c:(i + 1) * c] for i in cp.chunks(cp.rank)], dim=2)


def tiny_gpt(vocab: int = 100):
    """A seeded 1-layer, 16-token RoPE GPT in eval mode on one process (call from a test
    that uses the ``dist_cleanup`` fixture)."""
    from cope_megatron.config import load_config
    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.model.gpt import build_gpt
    from cope_megatron.pe import model_pe

    cfg = load_config(["model.num_layers=1", "model.hidden_size=32",
                       "model.num_attention_heads=4", "model.seq_length=16"])
    init_distributed(1)
    seed_everything(0)
    return build_gpt(cfg, model_pe(cfg.model), vocab).eval()


class Ours:
    """The run's latest checkpoint in our Megatron model, in one process."""

    def __init__(self, run_dir) -> None:
        from cope_megatron.config import load_config
        from cope_megatron.data.format import read_manifest
        from cope_megatron.distributed.parallel import init_distributed
        from cope_megatron.hf.export import megatron_state_dict
        from cope_megatron.model.gpt import build_gpt
        from cope_megatron.pe import model_pe

        cfg = load_config([str(run_dir / "config.yaml")])
        params, _ = megatron_state_dict(run_dir, cfg)
        one = load_config([str(run_dir / "config.yaml"), "parallel.tensor=1",
                           "parallel.sequence=false"])
        init_distributed(1)
        vocab = read_manifest(one.data.shards)["vocab_size"]
        self.model = build_gpt(one, model_pe(one.model), vocab).eval()
        missing, unexpected = self.model.load_state_dict(params, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return self.model(tokens, positions, None).float()

    def greedy(self, tokens: torch.Tensor, new: int) -> torch.Tensor:
        for _ in range(new):
            tokens = torch.cat([tokens, self.logits(tokens)[:, -1:].argmax(-1)], dim=1)
        return tokens


def train_bpe(texts: list[str], path: Path, vocab_size: int = 400,
              specials: tuple[str, ...] = ("<|endoftext|>", "<pad>"),
              metaspace: bool = False) -> Path:
    """A byte-level BPE ``tokenizer.json`` (GPT-2's kind; ``metaspace``: words marked with
    a leading ▁ as converted SentencePiece models are) trained on ``texts`` with the
    ``tokenizers`` library, saved at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    kind = "Metaspace" if metaspace else "ByteLevel"
    tok.pre_tokenizer = getattr(pre_tokenizers, kind)(
        **({} if metaspace else {"add_prefix_space": False}))
    tok.decoder = getattr(decoders, kind)()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def local_task_yaml(name: str, data: Path, body: str) -> str:
    """An lm-evaluation-harness task over a local JSONL file's docs (runs offline); ``body``
    gives its output type, prompts and metric."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{body}")


COPE_PATHS = {
    "eager": cope_paths.Paths(band="eager", far="flash", thread_heads=True),
    "native": cope_paths.Paths(band="native", far="flash", thread_heads=True),  # CPU's auto
    "eager_matmul": cope_paths.Paths(band="eager", far="matmul", thread_heads=False),
    "cuda": cope_paths.CUDA,  # CUDA's auto from COMPILE_MIN_SEQ keys on, at any length here
}
"""Every device-dependent choice of the chunked op, on this CPU: CUDA's below
``COMPILE_MIN_SEQ`` keys (eager band, matmul far keys) and above it (``CUDA``: torch.compile,
whose Inductor emits C++ here instead of Triton: the same graph, another backend)."""
