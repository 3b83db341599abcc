"""What a step reports beyond its loss (throughput, MFU, gradient norm, peak memory), and
the sinks on the main rank: ``metrics.jsonl`` in the run dir, and wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import Config, to_dict
from cope_megatron.estimate.flops import FlopsPerToken, peak_tflops, throughput


def proc_status_kb(field: str) -> int:
    """A kB field of /proc/self/status (``VmRSS:``, ``VmHWM:``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: the GPU allocator's, or on the CPU the peak
    resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return proc_status_kb("VmHWM:") / 2**20


class StepMetrics:
    """Per-step figures from the step's wall time: tokens/s, model TFLOP/s per device and
    MFU (``flops``), the gradient norm DeepSpeed computed for clipping, peak memory."""

    def __init__(self, cfg: Config, flops: FlopsPerToken, devices: int, data_parallel: int,
                 device: torch.device) -> None:
        t = cfg.train
        self.tokens_per_step = (t.micro_batch_size * t.grad_accum * data_parallel
                                * cfg.model.seq_length)
        self.flops = flops
        self.peak = peak_tflops(device, t.peak_tflops)
        self.devices = devices
        self.device = device

    def __call__(self, seconds: float, engine) -> dict:
        record = throughput(self.tokens_per_step, seconds, self.flops, self.devices, self.peak)
        norm = engine.get_global_grad_norm()
        record["grad_norm"] = None if norm is None else float(norm)
        record["peak_memory_gib"] = peak_memory_gib(self.device)
        return record


class MetricsLogger:
    def __init__(self, cfg: Config, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(cfg.run.dir) / "metrics.jsonl"
        self._wandb = None
        if enabled and cfg.logging.wandb != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.run.name or Path(cfg.run.dir).name,
                dir=cfg.run.dir,
                mode=cfg.logging.wandb,
                config=to_dict(cfg),
                resume="allow",
            )

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: after a crash they belong to a future that the
        resumed run recomputes."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def note(self, record: dict) -> None:
        """An event of the run (not a step's figures) into metrics.jsonl only: readers of
        step records take those with a ``loss``."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
