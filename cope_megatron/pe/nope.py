"""NoPE: no position encoding; causal masking alone carries order
(Haviv et al. 2022, "Transformer Language Models without Positional Encodings Still Learn
Positional Information", arXiv 2203.16634)."""

from cope_megatron.pe import register
from cope_megatron.pe.base import PositionEncoding

register(PositionEncoding(name="nope"))
