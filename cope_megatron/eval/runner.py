"""Evaluation of a built model, apart from training: the in-run held-out loss, the final
report (perplexity per length and passkey, or a task's error %), and lm-evaluation-harness
tasks. What every evaluation needs travels in one ``EvalContext`` (``eval.context``); each
scoring function takes it and its own settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import Config
from cope_megatron.eval.context import EvalContext
from cope_megatron.eval.passkey import passkey_accuracy
from cope_megatron.eval.perplexity import evaluate, evaluation_text, per_source, score
from cope_megatron.eval.position_loss import position_loss
from cope_megatron.eval.ruler.suite import ruler_suite
from cope_megatron.eval.task_error import task_errors
from cope_megatron.model.gpt import eval_mode

EVAL_FILE = "eval.json"


class Evaluator:
    def __init__(self, cfg: Config, ctx: EvalContext, run_dir: str | Path, *,
                 is_main: bool) -> None:
        """``is_main``: this rank writes ``run_dir``'s eval.json."""
        self.cfg, self.ctx, self.run_dir, self.is_main = cfg, ctx, Path(run_dir), is_main
        self._text: torch.Tensor | None = None

    @property
    def is_task(self) -> bool:
        return "task" in self.ctx.manifest

    def text(self) -> torch.Tensor:
        """The evaluation text, read once: every length scores the same tokens."""
        if self._text is None:
            self._text = evaluation_text(self.cfg, self.ctx.manifest)
        return self._text

    @torch.no_grad()
    def held_out(self) -> dict:
        """Held-out loss and perplexity at the training length (a task: its
        in-distribution error), for the training metrics."""
        e = self.cfg.eval
        if self.is_task:
            result = task_errors(self.ctx, e.batch_size, splits=["test"])["splits"]["test"]
            return {"val_error_pct": result["error_pct"]}
        length = self.ctx.train_length
        with eval_mode(self.ctx.model):
            result = score(self.ctx, self.text(), length, length, e.batch_size)
        return {"val_loss": result["loss"], "val_ppl": result["ppl"]}

    def report(self, step: int) -> dict:
        """Held-out perplexity per length (and, for a mixture, per source), passkey
        accuracy, loss against position and the RULER-style suite (when configured), or a
        task's error % per test split, of the model at ``step``; also written to
        eval.json."""
        e = self.cfg.eval
        if self.is_task:
            report = task_errors(self.ctx, e.batch_size)
        else:
            report = evaluate(self.ctx, e, self.text())
            if self.cfg.data.mixture:
                report["mixture"] = per_source(self.ctx, self.cfg)
            if e.passkey_samples:
                report["passkey"] = passkey_accuracy(self.ctx, e, self.cfg.train.seed)
            if e.position_loss:
                report["position_loss"] = position_loss(self.ctx, e, self.text())
            if e.ruler.tasks:
                report["ruler"] = ruler_suite(self.ctx, e, self.text())
        report["step"] = step
        self._write(report)
        return report

    def harness(self, report: dict) -> dict:
        """``eval.harness_tasks`` through lm-evaluation-harness, added to ``report`` and to
        eval.json: on the main rank with the run's exported latest checkpoint, or on every
        rank with the model itself (``eval.harness_model=native``)."""
        e = self.cfg.eval
        max_length = e.harness_max_length or self.cfg.model.seq_length
        if e.harness_model == "native":
            from cope_megatron.eval.harness_native import run_native_harness

            result = run_native_harness(
                self.ctx, self.run_dir, report["step"], e.harness_tasks,
                include=e.harness_include, limit=e.harness_limit, batch_size=e.batch_size,
                max_length=max_length)
        elif self.is_main:
            from cope_megatron.hf.harness import run_harness

            result = run_harness(
                self.run_dir, report["step"], e.harness_tasks, include=e.harness_include,
                limit=e.harness_limit, batch_size=e.batch_size, device=str(self.ctx.device),
                max_length=e.harness_max_length)
        if self.is_main:
            report["harness"] = result
            self._write(report)
        dist.barrier()
        return report

    def _write(self, report: dict) -> None:
        if self.is_main:
            write_text_atomic(self.run_dir / EVAL_FILE, json.dumps(report, indent=1))
