"""Rotary position embedding, RoPE (Su et al. 2021, arXiv 2104.09864): queries and keys
rotated by position-dependent angles θ_i = base^(−2i/d). Megatron-Core's native rotary
path, base from ``pe.rope.base``; partial rotary, p-RoPE and context-extension scaling
(``pe.rope``, ``pe.rope_scaling``) are in ``pe/rope_scaling.py``."""

from cope_megatron.pe import register
from cope_megatron.pe.base import PositionEncoding

register(PositionEncoding(name="rope", gpt_position_embedding="rope", hf_architecture="gpt_neox",
                          options=("rope", "rope_scaling")))
