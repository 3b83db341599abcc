"""Fused layers without TransformerEngine or Apex (``fusion.*``), and what ``auto`` picks.

Megatron-Core's own switches do not serve here: its fused norms need Apex or TE, and
``bias_activation_fusion`` computes GeLU's tanh approximation, another function than the
model's exact GeLU. torch.compile of each transformer layer in place (torchtitan's
regional compile) fuses the same element-wise work — norms, bias + GeLU, bias + dropout +
residual — and computes the unfused function. The cross-entropy without the logits of
the whole vocabulary is ``model/chunked_loss.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cope_megatron.config import FusionConfig

if TYPE_CHECKING:  # the estimate imports this module without building a model
    from megatron.core.models.gpt import GPTModel

AUTO_ON_CUDA: frozenset[str] = frozenset()
"""The fusions (``layers``, ``cross_entropy``) that ``auto`` turns on on CUDA: none until
the GPU suite (``bench/gpu_suite.sh``, stage c, fusions on and off) has measured them
faster. On the CPU ``auto`` is unfused: compiling costs more than it saves on small models,
and the chunked loss recomputes the output layer."""


def enabled(fusion: FusionConfig, name: str, device_type: str) -> bool:
    """Whether fusion ``name`` (``layers`` or ``cross_entropy``) runs on ``device_type``."""
    choice = getattr(fusion, name)
    if choice == "auto":
        return device_type == "cuda" and name in AUTO_ON_CUDA
    return choice in ("compile", "chunked")


def device_type() -> str:
    """Where ``build_gpt`` puts the model: the current CUDA device when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def compile_layers(model: GPTModel) -> None:
    """torch.compile every transformer layer and the final norm in place, so parameter
    names, and with them checkpoints, stay those of the unfused model."""
    for layer in model.decoder.layers:
        layer.compile()
    if model.decoder.final_layernorm is not None:
        model.decoder.final_layernorm.compile()
