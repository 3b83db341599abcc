"""Registry of position encodings: ``model.pe`` names one of these.

Each entry (``base.PositionEncoding``) holds every fact about its PE that the model, the
start-up check, the estimate and the export need. Adding a PE is one new module that calls
``register``, one import line below, and its branch in the readable reference model
``hf/modeling_cope_megatron.py`` (the whole model in plain PyTorch, checked against this
one by tests/test_export.py).
"""

from __future__ import annotations

from cope_megatron.config import ConfigError
from cope_megatron.pe.base import PositionEncoding

REGISTRY: dict[str, PositionEncoding] = {}


def register(pe: PositionEncoding) -> PositionEncoding:
    if pe.name in REGISTRY:
        raise ValueError(f"position encoding {pe.name!r} is registered twice")
    REGISTRY[pe.name] = pe
    return pe


def get_pe(name: str) -> PositionEncoding:
    """The PE ``model.pe`` names; a ConfigError naming the key for an unknown one. Resolved
    once per start, by ``cope_megatron.startup.check``, and passed down from there."""
    if name not in REGISTRY:
        raise ConfigError(f"model.pe: unknown position encoding {name!r}; choose one of "
                          f"{sorted(REGISTRY)}")
    return REGISTRY[name]


from cope_megatron.pe import (  # noqa: E402,F401,I001
    alibi, cope, fox, learned, nope, rope, sinusoidal, stickbreaking, t5)
