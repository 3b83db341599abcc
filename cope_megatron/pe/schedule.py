"""Per-layer position encodings: ``model.pe_schedule`` gives layer i the PE
``pe_schedule[i % len(pe_schedule)]``.

This is how hybrid models place positions: RNoPE (Yang et al. 2025, arXiv 2501.18795)
interleaves RoPE and NoPE layers, SmolLM3 drops RoPE in every fourth layer, and a CoPE
ablation may put CoPE in every k-th layer only. Each layer gets its own attention spec
(``model.layer_spec``); a schedule answers the model-level questions a single PE answers
(``PositionEncoding``'s fields), so the model, the estimate and the export take either.

A PE that adds positions to the input embedding (learned, sinusoidal) belongs to no layer
and cannot be scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass

from cope_megatron.config import Config
from cope_megatron.pe.base import PositionEncoding


@dataclass(frozen=True)
class PESchedule:
    pattern: tuple[PositionEncoding, ...]
    """The repeating pattern, from the first layer on."""

    @property
    def name(self) -> str:
        return "[" + ",".join(pe.name for pe in self.pattern) + "]"

    def per_layer(self, num_layers: int) -> tuple[PositionEncoding, ...]:
        return tuple(self.pattern[i % len(self.pattern)] for i in range(num_layers))

    @property
    def distinct(self) -> tuple[PositionEncoding, ...]:
        return tuple(dict.fromkeys(self.pattern))

    @property
    def gpt_position_embedding(self) -> str:
        """GPTModel computes the rotary tables once when any layer rotates; the others
        ignore them (``model.layer_spec``)."""
        return "rope" if self.rotary else "none"

    position_embedding = None
    extrapolates = True
    hf_architecture = None
    """No standard ``transformers`` architecture varies the PE by layer."""

    @property
    def rotary(self) -> bool:
        return any(pe.rotary for pe in self.pattern)

    @property
    def uses_cope_op(self) -> bool:
        return any(pe.uses_cope_op for pe in self.pattern)

    @property
    def biased(self) -> bool:
        return any(pe.biased for pe in self.pattern)

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o for pe in self.pattern for o in pe.options))

    def check(self, cfg: Config) -> None:
        for pe in self.distinct:
            if pe.check is not None:
                pe.check(cfg)
