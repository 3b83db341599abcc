"""What every evaluation needs beside its own settings (``cfg.eval``): the model, where it
runs (the device and this rank's share of the data-parallel ranks, which take alternate
batches), and the facts of the run it belongs to (its prepared data set, training length
and PE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cope_megatron.config import Config
from cope_megatron.data.tokenizer import Tokenizer, dataset_tokenizer
from cope_megatron.pe import label


@dataclass(frozen=True)
class EvalContext:
    model: torch.nn.Module
    manifest: dict
    """The manifest of ``shards``."""
    shards: str
    """The run's prepared data set (``data.shards``): its tokenizer, its validation split."""
    verify: str
    """When the shards' checksums are checked (``data.verify``)."""
    train_length: int
    pe: str
    """The PE with its RoPE scaling (``pe/rope_scaling.py``: ``label``), as the report names it."""
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1

    @classmethod
    def of_run(cls, cfg: Config, model: torch.nn.Module, manifest: dict,
               device: torch.device, dp_rank: int = 0, dp_size: int = 1) -> EvalContext:
        return cls(model=model, manifest=manifest, shards=cfg.data.shards,
                   verify=cfg.data.verify, train_length=cfg.model.seq_length, pe=label(cfg),
                   device=device, dp_rank=dp_rank, dp_size=dp_size)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the run's shards were prepared with."""
        return dataset_tokenizer(self.shards, self.manifest)

    def takes(self, batch: int) -> bool:
        """Whether this rank scores batch number ``batch`` (data-parallel ranks alternate)."""
        return batch % self.dp_size == self.dp_rank
