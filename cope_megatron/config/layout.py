"""A run's parallel layout: how its processes split into tensor-, context- and
data-parallel ranks. The arithmetic lives here once for the estimate, the launch
pre-check and the layout record each checkpoint carries."""

from __future__ import annotations

from dataclasses import dataclass

from cope_megatron.config.schema import Config


@dataclass(frozen=True)
class Layout:
    world: int
    tensor: int
    context: int
    zero_stage: int

    @classmethod
    def of(cls, cfg: Config, world: int) -> Layout:
        """``cfg``'s layout on ``world`` processes (``validate`` checks that it divides)."""
        return cls(world=world, tensor=cfg.parallel.tensor, context=cfg.parallel.context,
                   zero_stage=cfg.zero.stage)

    @property
    def data(self) -> int:
        return self.world // (self.tensor * self.context)

    @property
    def replicas(self) -> int:
        """Ranks holding copies of the same parameters, which ZeRO partitions over: data ×
        context parallel."""
        return self.data * self.context

    def record(self) -> dict:
        """What a checkpoint records of the layout it was saved under (``layout.json``):
        resuming on another number of replicas converts ZeRO states first."""
        return {"data_parallel": self.replicas, "tensor": self.tensor,
                "context": self.context, "zero_stage": self.zero_stage}
