"""Skip steps whose gradients are not finite, and stop a run that keeps producing them.

DeepSpeed's engine already skips an optimizer step, holds the LR schedule and counts it
when its optimizer reports ``overflow``: its ZeRO optimizers (stages 1–3) and its fp16/bf16
wrappers check the gradient norm for non-finite values, agreeing across ranks. Without
ZeRO in fp32 the engine steps our optimizer directly, so ``SkipNonFiniteAdamW`` gives it
the same contract. The trainer reads the outcome from ``engine.was_step_applied()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cope_megatron.distributed.parallel import any_rank
from cope_megatron.errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that applies nothing (no update, no moment change, no weight decay) when any
    gradient on any rank is non-finite, and then sets ``overflow`` for DeepSpeed."""

    def __init__(self, params, *, check: bool, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.check = check
        """Off where a DeepSpeed wrapper checks (and this step runs on partitions)."""
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.check:
            bad = any(not torch.isfinite(p.grad).all() for group in self.param_groups
                      for p in group["params"] if p.grad is not None)
            (self.overflow,) = any_rank(bad)
            if self.overflow:
                return None
        return super().step(closure)


class BadStepCounter:
    """Skipped steps in total and in a row; raises after ``limit`` in a row. No checkpoint
    is written during a run of skipped steps (the trainer asks ``skipping``): the weights
    that keep producing non-finite values are not worth resuming from, so the checkpoint
    the error names is the last one written before the streak."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    @property
    def skipping(self) -> bool:
        """The last step was skipped."""
        return self.in_a_row > 0

    def update(self, step: int, skipped: bool,
               last_checkpoint: Callable[[], str | None]) -> None:
        """Count step ``step``; ``last_checkpoint`` is asked only for the error."""
        self.total += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.limit and self.in_a_row >= self.limit:
            first = step - self.in_a_row + 1
            raise NonFiniteError(
                f"step {step}: the last {self.in_a_row} steps had a non-finite loss or "
                f"gradient norm and were skipped (train.max_bad_steps={self.limit}). Last "
                f"checkpoint before the first of them (step {first}): "
                f"{last_checkpoint() or 'none'}. Try a lower train.lr or a smaller "
                "train.grad_clip (or train.precision=fp32 for a bf16 run, which needs "
                "run.allow_config_change=[train.precision]); then run again to resume from "
                "that checkpoint with the new settings")
