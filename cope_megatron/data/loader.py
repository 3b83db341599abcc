"""The training loader: each rank's share of every global batch, in micro batches,
resumable from a step count alone.

Rank r of a DP group of D reads virtual streams r, r + D, … (see ``streams``); its
DataLoader workers split those streams between them. For every step each worker yields
its streams' samples of that step, so taking one item from each worker (DataLoader's
round-robin) gives the rank's whole share of the step, which is cut into ``grad_accum``
micro batches. The global batch of step k is the same whatever D, the micro batch ×
accumulation split and the worker count; the loader's state is just the number of steps
taken, and ``streams`` seeks there directly. TP and CP ranks of one replica share a
dp_rank, hence their samples. With a weighted mixture (``mixture``) each stream draws its
samples from the sources by a fixed schedule; the step count still fixes every position.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cope_megatron.data import integrity
from cope_megatron.data.format import DataError
from cope_megatron.data.mixture import MixedStreamReader, Mixture
from cope_megatron.data.source import StreamSpec
from cope_megatron.data.streams import StreamReader

# Workers start from a fork server, never by forking the trainer: by the time a loader
# starts, the trainer runs threads (gloo, OpenMP, DeepSpeed), and a child forked from a
# threaded process can inherit a lock held mid-operation and crash (it did: SIGSEGV in a
# worker, in the full suite's order only). The server imports this module once, so each
# worker forks in ~0.1 s instead of importing torch anew as under spawn.
WORKER_CONTEXT = multiprocessing.get_context("forkserver")
WORKER_CONTEXT.set_forkserver_preload([__name__])


def check_layout(spec: StreamSpec, mixture: Mixture | None = None) -> None:
    """Refuse a layout the streams cannot serve, naming the key to change."""
    sources = zip(mixture.names, mixture.specs(spec)) if mixture else ()
    for name, source in sources:
        if source.total_samples < source.num_streams:
            raise DataError(f"data.mixture: source {name} has {source.total_samples} "
                            f"samples, too few for {source.num_streams} data streams; lower "
                            "data.streams or prepare more data for it")
    streams, batch = spec.num_streams, spec.global_batch
    if batch % streams:
        raise DataError(f"data.streams: the global batch of {batch} samples (micro batch × "
                        f"accumulation × data-parallel size) must be a multiple of the "
                        f"{streams} streams")
    if streams % spec.dp_size:
        raise DataError(f"data.streams: {streams} streams cannot be shared by "
                        f"{spec.dp_size} data-parallel ranks; set data.streams to a multiple "
                        "of every data-parallel size the run will use")
    if spec.num_workers > streams // spec.dp_size:
        raise DataError(f"data.num_workers: {spec.num_workers} workers but each rank reads "
                        f"only {streams // spec.dp_size} streams; lower data.num_workers or "
                        "raise data.streams")
    if spec.total_samples < streams:
        raise DataError(f"{spec.total_samples} samples cannot feed {streams} data streams; "
                        "lower data.streams or prepare more data")


def _init_worker(trainer_pid: int, worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the trainer stops at the next
    step boundary (``training/preemption.py``) and needs its workers for that step, so a
    worker ignores it. A worker's parent is the fork server, not the trainer, so PyTorch's
    own watchdog (parent gone) never fires when the trainer is killed: the worker watches
    the trainer itself, or it and the server would stay behind, idle, for good."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_after, args=(trainer_pid,), daemon=True).start()


def _exit_after(pid: int, poll_s: float = 1.0) -> None:
    while True:
        time.sleep(poll_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)


class StepShares(IterableDataset):
    """One worker's part of this rank's samples, one item per step from ``start_step``.
    A bad shard under ``on_error=raise`` ends the stream with an item holding its one-line
    message: raised in a worker, it would reach the trainer wrapped in the worker's
    traceback."""

    def __init__(self, spec: StreamSpec, start_step: int = 0,
                 mixture: Mixture | None = None) -> None:
        self.spec, self.start_step, self.mixture = spec, start_step, mixture
        # Shards this process already verified: a worker need not hash them again.
        self.verdicts = integrity.results()

    def __iter__(self) -> Iterator[dict]:
        integrity.adopt(self.verdicts)
        try:
            yield from self._steps()
        except DataError as e:
            yield {"data_error": str(e)}

    def _steps(self) -> Iterator[dict]:
        spec = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = list(range(spec.dp_rank, spec.num_streams, spec.dp_size))[worker::workers]
        per_stream = spec.global_batch // spec.num_streams
        start = self.start_step * per_stream
        readers = [MixedStreamReader(spec, self.mixture, s, start) if self.mixture
                   else StreamReader(spec, s, start) for s in mine]
        streams = [iter(r) for r in readers]
        while True:
            tokens, masks = zip(*(next(s) for s in streams for _ in range(per_stream)))
            item = {"tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),
                    "skipped_shards": sum(r.skipped_shards for r in readers)}
            if spec.loss_mask:
                item["loss_mask"] = torch.from_numpy(np.stack(masks).astype(np.float32))
            yield item


class ResumableLoader:
    """Iterator of micro batches ({"tokens"[, "loss_mask"]}); ``grad_accum`` of them make
    a step. Its position (``state_dict``, taken between steps) goes into checkpoints.
    ``mixture``: draw from its sources (``spec`` gives the layout, its shards the first
    source's)."""

    def __init__(self, spec: StreamSpec, start_steps: int = 0,
                 mixture: Mixture | None = None) -> None:
        check_layout(spec, mixture)
        self.spec, self.mixture = spec, mixture
        self.steps = start_steps
        self._workers = max(1, spec.num_workers)
        self._skipped = [0] * self._workers
        self._pending: list[dict] = []
        self._loader = DataLoader(
            StepShares(spec, start_steps, mixture),
            batch_size=None,
            num_workers=spec.num_workers if spec.num_workers > 1 else 0,
            persistent_workers=False,
            prefetch_factor=2 if spec.num_workers > 1 else None,
            multiprocessing_context=WORKER_CONTEXT if spec.num_workers > 1 else None,
            worker_init_fn=(functools.partial(_init_worker, os.getpid())
                            if spec.num_workers > 1 else None),
        )
        self._it = iter(self._loader)

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            parts = [next(self._it) for _ in range(self._workers)]
            for part in parts:
                if "data_error" in part:
                    self.close()
                    raise DataError(part["data_error"])
            self._skipped = [int(p.pop("skipped_shards")) for p in parts]
            step = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            mb = self.spec.micro_batch_size
            self._pending = [{k: v[i:i + mb] for k, v in step.items()}
                             for i in range(0, len(step["tokens"]), mb)]
            self.steps += 1
        return self._pending.pop(0)

    def close(self) -> None:
        """Stop the workers now. Left to the garbage collector (a trainer's references form
        cycles), their queues may be finalized first: each worker then waits out a 5 s
        timeout before it is terminated."""
        self._it = None

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far (``data.on_error=skip``), summed over workers."""
        return sum(self._skipped)

    @property
    def epoch(self) -> float:
        """Samples drawn over samples held (by all sources of a mixture)."""
        held = (sum(s.total_samples for s in self.mixture.specs(self.spec)) if self.mixture
                else self.spec.total_samples)
        return self.steps * self.spec.global_batch / held

    def source_samples(self) -> dict[str, int] | None:
        """A mixture's samples drawn so far from each source (None: one source)."""
        if not self.mixture:
            return None
        drawn = self.mixture.schedule(self.spec.seed).counts(self.steps * self.spec.global_batch)
        return dict(zip(self.mixture.names, drawn))

    def source_epochs(self) -> dict[str, float] | None:
        """Each source's passes so far (past 1: it repeats); None: one source."""
        drawn = self.source_samples()
        if drawn is None:
            return None
        sizes = [s.total_samples for s in self.mixture.specs(self.spec)]
        return {name: n / size for (name, n), size in zip(drawn.items(), sizes)}

    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("the loader's state is taken between steps")
        s = self.spec
        state = {"steps": self.steps, "streams": s.num_streams, "global_batch": s.global_batch,
                 "shuffle_buffer": s.shuffle_buffer, "seed": s.seed}
        if self.mixture:
            state["mixture_shares"] = self.mixture.shares
            state["source_samples"] = self.source_samples()
        return state

    @staticmethod
    def check_state(state: dict, spec: StreamSpec, mixture: Mixture | None = None) -> int:
        """Steps to start from on resume; refuses a change of the data order (any layout
        with the same global batch continues it)."""
        now = {"streams": spec.num_streams, "global_batch": spec.global_batch,
               "shuffle_buffer": spec.shuffle_buffer, "seed": spec.seed,
               "mixture_shares": mixture.shares if mixture else None}
        for key, value in now.items():
            if state.get(key) != value:
                raise DataError(
                    f"the checkpoint's data order used {key}={state.get(key)} but this run "
                    f"has {value}; resume with the same setting (data.streams, the global "
                    "batch = micro batch × accumulation × data-parallel size, "
                    "data.shuffle_buffer, train.seed, data.mixture) to continue exactly")
        if mixture:  # the schedule itself (this code's) must place the sources as it did
            drawn = mixture.schedule(spec.seed).counts(state["steps"] * spec.global_batch)
            if list(state["source_samples"].values()) != drawn:
                raise DataError(
                    f"the checkpoint had drawn {state['source_samples']} samples per source "
                    f"by step {state['steps']}, but this code's mixture schedule draws "
                    f"{drawn}; resume with the version that wrote the checkpoint")
        return state["steps"]
