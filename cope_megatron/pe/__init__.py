"""Registry of position encodings: ``model.pe`` names one of these.

Each entry (``base.PositionEncoding``) holds every fact about its PE that the model, the
start-up check, the estimate and the export need. Adding a PE is one new module that calls
``register``, one import line below, and its branch in the readable reference model
``hf/modeling_cope_megatron.py`` (the whole model in plain PyTorch, checked against this
one by tests/test_export.py).
"""

from __future__ import annotations

from cope_megatron.config import Config, ConfigError, ModelConfig
from cope_megatron.pe.base import PositionEncoding
from cope_megatron.pe.rope_scaling import scaling_type
from cope_megatron.pe.schedule import PESchedule

REGISTRY: dict[str, PositionEncoding] = {}

ModelPE = PositionEncoding | PESchedule
"""What a model's layers use: one PE in all of them, or a schedule."""


def register(pe: PositionEncoding) -> PositionEncoding:
    if pe.name in REGISTRY:
        raise ValueError(f"position encoding {pe.name!r} is registered twice")
    REGISTRY[pe.name] = pe
    return pe


def get_pe(name: str, key: str = "model.pe") -> PositionEncoding:
    """The PE ``name``; a ConfigError naming ``key`` for an unknown one."""
    if name not in REGISTRY:
        raise ConfigError(f"{key}: unknown position encoding {name!r}; choose one of "
                          f"{sorted(REGISTRY)}")
    return REGISTRY[name]


def label(cfg: Config) -> str:
    """What evaluations and reports call the model's PE, so that each setting is its own
    row: ``model.pe`` or its schedule (``PESchedule.name``: [rope,nope]), then its length
    scale (``+logn``: fixed s, ``+ssmax``: learned) and its RoPE scaling (``+yarn×8``)."""
    name = model_pe(cfg.model).name
    name += {"none": "", "fixed": "+logn", "learned": "+ssmax"}[cfg.pe.length_scale.type]
    kind = scaling_type(cfg)
    return name if kind == "none" else f"{name}+{kind}×{cfg.pe.rope_scaling.factor:g}"


def model_pe(model: ModelConfig) -> PositionEncoding | PESchedule:
    """The model's PE: ``model.pe``, or its layers' ``model.pe_schedule``. Resolved once
    per start, by ``cope_megatron.startup.check``, and passed down from there."""
    pe = get_pe(model.pe)
    if not model.pe_schedule:
        return pe
    pattern = tuple(get_pe(name, "model.pe_schedule") for name in model.pe_schedule)
    for entry in pattern:
        if entry.position_embedding is not None or not entry.extrapolates:
            raise ConfigError(f"model.pe_schedule: {entry.name} adds positions to the input "
                              "embedding, not in a layer, and cannot be given per layer; "
                              "schedule attention PEs only")
    if pe not in pattern:
        raise ConfigError(f"model.pe: {model.pe} is not in model.pe_schedule "
                          f"{list(model.pe_schedule)}; set model.pe to the PE the schedule "
                          "is an ablation of (one of its entries)")
    return PESchedule(pattern)


from cope_megatron.pe import (  # noqa: E402,F401,I001
    alibi, cope, fire, fox, kerple, learned, nope, rope, sinusoidal, stickbreaking, t5,
)
