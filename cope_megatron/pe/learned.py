"""Learned absolute position embeddings added to the token embeddings (GPT-2 style;
Vaswani et al. 2017 §3.5). Megatron's native ``learned_absolute`` table; positions beyond
the training length have no embedding, so it cannot extrapolate."""

from cope_megatron.pe import register
from cope_megatron.pe.base import PositionEncoding

register(
    PositionEncoding(
        name="learned",
        gpt_position_embedding="learned_absolute",
        extrapolates=False,
        hf_architecture="gpt2",
    )
)
