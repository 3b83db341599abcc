"""The trainer: build (model, DeepSpeed engine, data), then a loop you can read at once.

DeepSpeed owns backward, optimizer step, ZeRO and checkpoint files; we own data, loss,
schedule and logging. Parallel plumbing lives in ``cope_megatron.distributed``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from cope_megatron import checkpoint
from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import Config, dump_yaml, to_dict
from cope_megatron.data.loader import ResumableLoader
from cope_megatron.data.source import StreamSpec, read_manifest, split_spec
from cope_megatron.distributed.deepspeed_glue import (
    MegatronMPU,
    deepspeed_config,
    keep_fp32_grad_norm,
)
from cope_megatron.distributed.parallel import (
    DistEnv,
    any_rank,
    init_distributed,
    mean_over_replicas,
    replica_group,
    seed_everything,
    sum_over_data_parallel,
)
from cope_megatron.distributed.sequence_parallel import register_sequence_parallel_grad_hooks
from cope_megatron.distributed.universal import (
    checkpoint_info,
    convert,
    needs_conversion,
    read_layout,
    stage_family,
)
from cope_megatron.estimate import estimate, summary
from cope_megatron.eval.passkey import passkey_accuracy
from cope_megatron.eval.perplexity import evaluate, evaluation_text, score
from cope_megatron.eval.tasks import task_errors
from cope_megatron.launch import check_same_everywhere
from cope_megatron.metrics import MetricsLogger, StepMetrics
from cope_megatron.model.gpt import build_gpt, eval_mode, loss_sum
from cope_megatron.nonfinite import BadStepCounter, SkipNonFiniteAdamW
from cope_megatron.preemption import PreemptionHandler
from cope_megatron.schedule import lr_at


def build_engine(cfg: Config, vocab_size: int, load_universal: bool = False):
    """GPT + AdamW + LR schedule wrapped in a DeepSpeed engine (ZeRO per ``zero.stage``);
    ``load_universal``: the engine will load a universal checkpoint."""
    model = build_gpt(cfg, vocab_size)
    model.universal_checkpoint_info = checkpoint_info(model)  # saved with every checkpoint
    if cfg.parallel.sequence:
        register_sequence_parallel_grad_hooks(model)
    t = cfg.train
    optimizer = SkipNonFiniteAdamW(
        model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
        check=cfg.zero.stage == 0 and t.precision == "fp32")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_at(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps,
                           total=t.steps, decay=t.lr_decay) / t.lr,
    )
    ds_config = deepspeed_config(cfg, dist.get_world_size(replica_group()))
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config,
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    keep_fp32_grad_norm(engine)
    return engine


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    run_dir: Path
    stopped_by: str | None = None
    """The signal that stopped the run early (after saving), if any."""


class Trainer:
    def __init__(self, cfg: Config, *, eval_only: bool = False) -> None:
        """``eval_only``: restore the latest checkpoint and leave the run dir untouched."""
        self.cfg = cfg
        self.env: DistEnv = init_distributed(cfg.parallel.tensor, cfg.parallel.context)
        seed_everything(cfg.train.seed)
        self.run_dir = Path(cfg.run.dir)
        if self.env.is_main and not eval_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
        self.manifest = read_manifest(cfg.data.shards)
        check_same_everywhere(cfg, self.manifest)
        tag = checkpoint.latest_tag(self.run_dir) if cfg.run.resume or eval_only else None
        if tag is not None:
            tag = self._loadable(tag)
        self.engine = build_engine(cfg, self.manifest["vocab_size"],
                                   load_universal=bool(tag and tag.endswith("_universal")))
        self.step = 0
        start_steps = 0
        state = checkpoint.load(self.engine, self.run_dir, tag) if tag else None
        spec = self._stream_spec()
        if state is not None:
            self.step = state["step"]
            if not eval_only:  # evaluation reads no training data
                start_steps = ResumableLoader.check_state(state["data"], spec)
        self.data = ResumableLoader(spec, start_steps)
        self.metrics = MetricsLogger(cfg, enabled=self.env.is_main and not eval_only)
        self.metrics.truncate_after(self.step)
        self.step_metrics = StepMetrics(cfg, self.manifest["vocab_size"], self.env.world_size,
                                        self.env.dp_size, self.env.device)
        if self.env.is_main and not eval_only and cfg.logging.progress:
            print(self.estimate_summary(), flush=True)
        self.preemption = None if eval_only else PreemptionHandler()
        self._last_save = time.monotonic()
        self._val_text: torch.Tensor | None = None
        self.bad_steps = BadStepCounter(cfg.train.max_bad_steps)
        self.bad_steps.total = state.get("skipped_steps", 0) if state else 0

    # -- building -------------------------------------------------------------------

    @property
    def layout(self) -> dict:
        p = self.cfg.parallel
        return {"data_parallel": dist.get_world_size(replica_group()), "tensor": p.tensor,
                "context": p.context, "zero_stage": self.cfg.zero.stage}

    def estimate_summary(self) -> str:
        """The run's estimate (``cope-megatron estimate``) for its start-up log; on a GPU,
        against the device's memory."""
        device = self.env.device
        gib = (torch.cuda.get_device_properties(device).total_memory / 2**30
               if device.type == "cuda" else None)
        est = estimate(self.cfg, self.env.world_size, gib,
                       vocab_size=self.manifest["vocab_size"], device=device.type)
        return "[estimate] " + summary(est, peak_tflops=self.step_metrics.peak,
                                       fit=device.type == "cuda").replace("\n", "\n[estimate] ")

    def _loadable(self, tag: str) -> str:
        """``tag``, or its universal conversion when its ZeRO states were partitioned for
        another data-parallel size."""
        root = checkpoint.checkpoint_dir(self.run_dir)
        saved = read_layout(root / tag)
        if not needs_conversion(saved, self.layout):
            return tag
        if stage_family(saved["zero_stage"]) != stage_family(self.cfg.zero.stage):
            raise checkpoint.CheckpointError(
                f"checkpoint {root / tag} was saved under ZeRO-{saved['zero_stage']} on "
                f"{saved['data_parallel']} data-parallel ranks; resuming on another number "
                "converts it to a universal checkpoint, which loads into stages 1-2 when "
                "saved from 1-2, into stage 3 when saved from 3: set zero.stage accordingly")
        if self.env.is_main:
            convert(root, tag)
        dist.barrier()
        return f"{tag}_universal"

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
            loss = weight * loss_sum(self.engine, batch["tokens"].to(self.env.device),
                                     None if mask is None else mask.to(self.env.device))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        return mean_over_replicas(total / gas)

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
            self.bad_steps.update(self.step, skipped,
                                  lambda: checkpoint.latest_tag(self.run_dir))
            record = {"step": self.step, "loss": loss, "lr": self.engine.get_lr()[0],
                      **self.step_metrics(elapsed, self.engine), "epoch": self.data.epoch,
                      "skipped_shards": self.data.skipped_shards,
                      "skipped_steps": self.bad_steps.total}
            validated = bool(cfg.eval.interval) and self.step % cfg.eval.interval == 0
            if validated:
                record.update(self.validate())
            if validated or self.step % cfg.train.log_interval == 0 or \
                    self.step == cfg.train.steps:
                self.metrics.log(record)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"mfu": f"{record['mfu']:.1%}"} if record["mfu"] is not None
                               else {"tflops": f"{record['tflops_per_device']:.2f}"}))
            bar.update(1)
            signalled, save_due = any_rank(self.preemption.received is not None,
                                           self._save_due())
            if save_due or signalled:
                self.save()
            if signalled:
                stopped_by = self.preemption.received or "a stop signal on another rank"
                break
        bar.close()
        if stopped_by and self.env.is_main:
            print(f"[train] stopped by {stopped_by} after step {self.step}; checkpoint saved "
                  f"in {checkpoint.checkpoint_dir(self.run_dir)}: run the same command to "
                  "resume", flush=True)
        return TrainResult(step=self.step, losses=losses, run_dir=self.run_dir,
                           stopped_by=stopped_by)

    def _save_due(self) -> bool:
        t = self.cfg.train
        return (self.step == t.steps or bool(t.save_interval) and self.step % t.save_interval == 0
                or bool(t.save_interval_minutes)
                and time.monotonic() - self._last_save >= 60 * t.save_interval_minutes)

    @property
    def _eval_args(self) -> tuple:
        """(model, config, manifest, device, dp_rank, dp_size) for the eval functions."""
        return (self.engine, self.cfg, self.manifest, self.env.device, self.env.dp_rank,
                self.env.dp_size)

    @torch.no_grad()
    def validate(self) -> dict:
        """Held-out loss and perplexity at the training length (a task: its
        in-distribution error), for the metrics."""
        if "task" in self.manifest:
            result = task_errors(*self._eval_args, splits=["test"])["splits"]["test"]
            return {"val_error_pct": result["error_pct"]}
        if self._val_text is None:
            self._val_text = evaluation_text(self.cfg, self.manifest)
        length = self.cfg.model.seq_length
        with eval_mode(self.engine):
            result = score(self.engine, self._val_text, length, length,
                           self.cfg.eval.batch_size, *self._eval_args[3:])
        return {"val_loss": result["loss"], "val_ppl": result["ppl"]}

    def evaluate(self) -> dict:
        """Held-out perplexity per length and passkey accuracy, or a task's error % per
        test split, at the current step; also written to eval.json."""
        where = self._eval_args
        if "task" in self.manifest:
            report = task_errors(*where)
        else:
            report = evaluate(*where)
            if self.cfg.eval.passkey_samples:
                report["passkey"] = passkey_accuracy(*where)
        report["step"] = self.step
        if self.env.is_main:
            write_text_atomic(self.run_dir / "eval.json", json.dumps(report, indent=1))
        return report

    def harness(self, report: dict) -> dict:
        """``eval.harness_tasks`` through lm-evaluation-harness on the main rank, added to
        ``report`` (an ``evaluate`` result) and to eval.json."""
        e = self.cfg.eval
        if self.env.is_main:
            from cope_megatron.hf.harness import run_harness

            report["harness"] = run_harness(
                self.run_dir, self.step, e.harness_tasks, include=e.harness_include,
                limit=e.harness_limit, batch_size=e.batch_size, device=str(self.env.device))
            write_text_atomic(self.run_dir / "eval.json", json.dumps(report, indent=1))
        dist.barrier()
        return report

    def save(self) -> str:
        state = {"step": self.step, "data": self.data.state_dict(), "config": to_dict(self.cfg),
                 "skipped_steps": self.bad_steps.total}
        tag = checkpoint.save(self.engine, self.run_dir, self.step, state, self.layout,
                              keep=self.cfg.train.keep_checkpoints)
        self._last_save = time.monotonic()
        return tag

    def close(self) -> None:
        self.metrics.close()
        if self.preemption is not None:
            self.preemption.close()

