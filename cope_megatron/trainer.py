"""The trainer: build (model, DeepSpeed engine, data), then a loop you can read at once.

DeepSpeed owns backward, optimizer step, ZeRO and checkpoint files; we own data, loss,
schedule and logging. Parallel plumbing lives in ``cope_megatron.distributed``; the engine
and its restore in ``training.engine``; evaluation in ``eval.runner``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from cope_megatron import checkpoint
from cope_megatron.config import Config, padded_vocab_size, to_dict
from cope_megatron.data.format import read_manifest
from cope_megatron.data.loader import ResumableLoader
from cope_megatron.data.mixture import mixture_of
from cope_megatron.data.source import StreamSpec, located, split_spec
from cope_megatron.distributed.consistency import check_same_everywhere
from cope_megatron.distributed.parallel import (
    DistEnv,
    any_rank,
    decided_by_main,
    init_distributed,
    mean_over_replicas,
    replica_group,
    seed_everything,
    sum_over_data_parallel,
)
from cope_megatron.errors import UserError
from cope_megatron.estimate import estimate, summary
from cope_megatron.estimate.flops import flops_per_token
from cope_megatron.eval.context import EvalContext
from cope_megatron.eval.runner import Evaluator
from cope_megatron.model.gpt import loss_sum
from cope_megatron.pe import ModelPE
from cope_megatron.training.engine import restore, run_layout
from cope_megatron.training.metrics import MetricsLogger, StepMetrics
from cope_megatron.training.nonfinite import BadStepCounter
from cope_megatron.training.preemption import PreemptionHandler
from cope_megatron.training.resume import (
    Resume,
    apply_optimizer_settings,
    compared_values,
    plan,
    write_config,
)
from cope_megatron.training.run_lock import RunLock


class OutOfMemory(UserError, RuntimeError):
    """A training step that does not fit in the memory of its device."""


def _out_of_memory(e: Exception) -> bool:
    """The allocator's failure: CUDA's OutOfMemoryError, the CPU allocator's, Python's."""
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError))
            or "can't allocate memory" in str(e))


def start(cfg: Config) -> tuple[DistEnv, dict]:
    """Process groups and seeds for ``cfg``, and the data manifest every rank has checked
    to be the same (with the config) on every other rank."""
    env = init_distributed(cfg.parallel.tensor, cfg.parallel.context)
    seed_everything(cfg.train.seed)
    manifest = located(read_manifest(cfg.data.shards), cfg.data.url_prefix, cfg.data.url_suffix)
    check_same_everywhere(cfg, manifest)
    return env, manifest


def evaluator(cfg: Config, engine, env: DistEnv, manifest: dict) -> Evaluator:
    ctx = EvalContext.of_run(cfg, engine, manifest, env.device, env.dp_rank, env.dp_size)
    return Evaluator(cfg, ctx, cfg.run.dir, is_main=env.is_main)


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    run_dir: Path
    stopped_by: str | None = None
    """The signal that stopped the run early (after saving), if any."""


class Trainer:
    def __init__(self, cfg: Config, pe: ModelPE) -> None:
        """``pe``: ``cfg.model.pe`` as ``startup.check`` resolved it. Nothing is built or
        written before the run holds its directory and its resume is checked."""
        self.cfg, self.pe = cfg, pe
        self.env, self.manifest = start(cfg)
        self.run_dir = Path(cfg.run.dir)
        spec = self._stream_spec()
        self.lock = RunLock(self.run_dir)
        values = compared_values(cfg, self.manifest, spec.global_batch, spec.num_streams)
        resume = decided_by_main(lambda: self._open(values))
        try:
            self._build(resume, spec, values)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, values: dict) -> Resume:
        """On rank 0: lock the run directory, check the resume, then write config.yaml."""
        said = self.lock.acquire()
        if said:
            print(said, flush=True)
        try:
            resume = plan(self.cfg, values)
            write_config(self.cfg, self.run_dir, resume.step)
        except BaseException:
            self.lock.release()
            raise
        if resume.note:
            print(f"[checkpoint] {resume.note}", flush=True)
        return resume

    def _build(self, resume: Resume, spec: StreamSpec, values: dict) -> None:
        cfg = self.cfg
        self.record = {"values": values}
        self.engine, state = restore(cfg, self.pe, self.env, self.manifest, tag=resume.tag)
        if state is not None:
            apply_optimizer_settings(self.engine, cfg)
        self.step = state["step"] if state else 0
        self.last_tag = resume.tag
        # The data order was compared with the checkpoint's record (a change allowed on
        # purpose goes through); a checkpoint without one is checked by the loader.
        mixture = mixture_of(cfg.data.mixture) if cfg.data.mixture else None
        start_steps = (0 if state is None else state["data"]["steps"] if resume.compared
                       else ResumableLoader.check_state(state["data"], spec, mixture))
        self.data = ResumableLoader(spec, start_steps, mixture)
        self.evaluator = evaluator(cfg, self.engine, self.env, self.manifest)
        self.metrics = MetricsLogger(cfg, enabled=self.env.is_main)
        self.metrics.truncate_after(self.step)
        if resume.changes:
            self.metrics.note({"step": self.step, "config_change": resume.changes})
        vocab = padded_vocab_size(self.manifest["vocab_size"], 1)
        self.step_metrics = StepMetrics(cfg, flops_per_token(cfg, self.pe, vocab),
                                        self.env.world_size, self.env.dp_size, self.env.device)
        if self.env.is_main and cfg.logging.progress:
            print(self.estimate_summary(), flush=True)
        self.preemption = PreemptionHandler(self._lost)
        self._last_save = time.monotonic()
        self.bad_steps = BadStepCounter(cfg.train.max_bad_steps)
        self.bad_steps.total = state.get("skipped_steps", 0) if state else 0

    def _lost(self) -> str:
        """What exiting now loses: the steps since the last checkpoint."""
        saved = checkpoint.step_of(self.last_tag) if self.last_tag else 0
        if saved == self.step:
            return f"nothing is lost ({self.last_tag or 'no step was trained'})"
        since = f"the last checkpoint, {self.last_tag}" if self.last_tag else "the start"
        return f"steps {saved + 1}-{self.step} since {since} are lost"

    # -- building -------------------------------------------------------------------

    def estimate_summary(self) -> str:
        """The run's estimate (``cope-megatron estimate``) for its start-up log; on a GPU,
        against the device's memory."""
        device = self.env.device
        gib = (torch.cuda.get_device_properties(device).total_memory / 2**30
               if device.type == "cuda" else None)
        est = estimate(self.cfg, self.pe, self.env.world_size, gib,
                       vocab_size=self.manifest["vocab_size"], device=device.type)
        return "[estimate] " + summary(est, peak_tflops=self.step_metrics.peak,
                                       fit=device.type == "cuda").replace("\n", "\n[estimate] ")

    def _stream_spec(self) -> StreamSpec:
        cfg = self.cfg
        return split_spec(
            cfg.data.shards, self.manifest, "train",
            seed=cfg.train.seed,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum,
            dp_rank=self.env.dp_rank,
            dp_size=self.env.dp_size,
            num_workers=cfg.data.num_workers,
            streams=cfg.data.streams,
            shuffle_buffer=cfg.data.shuffle_buffer,
            on_error=cfg.data.on_error,
            verify=cfg.data.verify,
            url_retries=cfg.data.url_retries,
            url_backoff_s=cfg.data.url_backoff_s,
        )

    # -- the loop -------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro batches; returns the mean loss per
        trained prediction of the global batch (over micro batches, data-parallel ranks
        and context-parallel chunks)."""
        gas = self.cfg.train.grad_accum
        batches = [next(self.data) for _ in range(gas)]
        # Every trained prediction of the global batch weighs the same, wherever loss masks
        # put them: DeepSpeed divides by gas and averages over DP × CP, so scale by both
        # over the global count. Without masks this is each rank's mean.
        counted = sum(b["loss_mask"].sum().item() if "loss_mask" in b
                      else b["tokens"][:, 1:].numel() for b in batches)
        weight = dist.get_world_size(replica_group()) * gas / max(
            sum_over_data_parallel(counted), 1.0)
        total = 0.0
        for batch in batches:
            mask = batch.get("loss_mask")
            try:
                loss = weight * loss_sum(self.engine, batch["tokens"].to(self.env.device),
                                         None if mask is None else mask.to(self.env.device))
                self.engine.backward(loss)
                self.engine.step()
            except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is one too
                if not _out_of_memory(e):
                    raise
                raise OutOfMemory(self._oom_message(batch["tokens"].shape)) from e
            total += loss.detach()
        return mean_over_replicas(total / gas)

    def _oom_message(self, shape: torch.Size) -> str:
        p = self.cfg.parallel
        return (f"out of memory in step {self.step + 1} on rank {dist.get_rank()}: a micro "
                f"batch of {shape[0]} × {shape[1] - 1} tokens, {(shape[1] - 1) // p.context} "
                f"per rank at parallel.context={p.context}, does not fit; raise "
                "parallel.context, set train.recompute=selective or full, or lower "
                f"train.micro_batch_size; the last checkpoint is {self.last_tag or 'none'} in "
                f"{checkpoint.checkpoint_dir(self.run_dir)}")

    def train(self) -> TrainResult:
        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.env.is_main and cfg.logging.progress))
        losses, stopped_by = [], None
        while self.step < cfg.train.steps:
            started = time.perf_counter()
            loss = self.train_step()
            elapsed = time.perf_counter() - started
            self.step += 1
            losses.append(loss)
            skipped = not self.engine.was_step_applied() or not math.isfinite(loss)
            self.bad_steps.update(self.step, skipped, lambda: self.last_tag)
            record = {"step": self.step, "loss": loss, "lr": self.engine.get_lr()[0],
                      **self.step_metrics(elapsed, self.engine), "epoch": self.data.epoch,
                      "skipped_shards": self.data.skipped_shards,
                      **({"source_epochs": self.data.source_epochs()} if cfg.data.mixture
                         else {}),
                      "skipped_steps": self.bad_steps.total}
            validated = bool(cfg.eval.interval) and self.step % cfg.eval.interval == 0
            if validated:
                record.update(self.evaluator.held_out())
            if validated or self.step % cfg.train.log_interval == 0 or \
                    self.step == cfg.train.steps:
                self.metrics.log(record)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None
                               else {"tflops": f"{record['tflops_per_device']:.2f}"}))
            bar.update(1)
            signalled, save_due = any_rank(self.preemption.received is not None,
                                           self._save_due())
            if (save_due or signalled) and not self.bad_steps.skipping:
                self.save()
            if signalled:
                stopped_by = self.preemption.received or "a stop signal on another rank"
                break
        bar.close()
        if self.bad_steps.skipping and not stopped_by and self.env.is_main:
            print(f"[train] finished on a skipped step: {self._saved_where()}", flush=True)
        if stopped_by and self.env.is_main:
            print(f"[train] stopped by {stopped_by} after step {self.step}; "
                  f"{self._saved_where()}: run the same command to resume", flush=True)
        return TrainResult(step=self.step, losses=losses, run_dir=self.run_dir,
                           stopped_by=stopped_by)

    def _save_due(self) -> bool:
        t = self.cfg.train
        return (self.step == t.steps or bool(t.save_interval) and self.step % t.save_interval == 0
                or bool(t.save_interval_minutes)
                and time.monotonic() - self._last_save >= 60 * t.save_interval_minutes)

    def _saved_where(self) -> str:
        root = checkpoint.checkpoint_dir(self.run_dir)
        if self.last_tag == checkpoint.tag_of(self.step):
            return f"checkpoint saved in {root}"
        return (f"no checkpoint written (step {self.step} was skipped: non-finite); the last "
                f"one is {self.last_tag or 'none'} in {root}")

    def save(self) -> str:
        state = {"step": self.step, "data": self.data.state_dict(), "config": to_dict(self.cfg),
                 "skipped_steps": self.bad_steps.total}
        tag = checkpoint.save(self.engine, self.run_dir, self.step, state, run_layout(self.cfg),
                              self.record, keep=self.cfg.train.keep_checkpoints)
        self._last_save = time.monotonic()
        self.last_tag = tag
        return tag

    def close(self) -> None:
        self.data.close()
        self.metrics.close()
        self.preemption.close()
        self.lock.release()

