"""Metrics sinks on the main rank: ``metrics.jsonl`` in the run dir, and wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import Config, to_dict


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

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
