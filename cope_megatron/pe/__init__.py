"""Registry of position encodings: ``model.pe`` names one of these.

Adding a PE is one new module that calls ``register`` and one import line below.
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
    """The PE ``model.pe`` names; a ConfigError naming the key for an unknown one."""
    if name not in REGISTRY:
        raise ConfigError(f"model.pe: unknown position encoding {name!r}; choose one of "
                          f"{sorted(REGISTRY)}")
    return REGISTRY[name]


from cope_megatron.pe import alibi, cope, learned, nope, rope, sinusoidal, t5  # noqa: E402,F401,I001
