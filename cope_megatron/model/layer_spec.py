"""The transformer layer spec for a position encoding: Megatron's local GPT layer with our
core attention and sequence-parallel-capable norms."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from cope_megatron.config import Config
from cope_megatron.model.attention import PECoreAttention
from cope_megatron.model.norm import SequenceParallelNorm
from cope_megatron.model.token_gate import TokenGateSelfAttention
from cope_megatron.pe import PositionEncoding


def get_layer_spec(cfg: Config, pe: PositionEncoding) -> TransformerBlockSubmodules:
    """Layer specs for every layer plus the final norm, as GPTModel accepts them."""
    spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization)
    layer = spec.submodules
    layer.input_layernorm = SequenceParallelNorm
    layer.pre_mlp_layernorm = SequenceParallelNorm
    if pe.token_gate:
        layer.self_attention.module = TokenGateSelfAttention
    layer.self_attention.submodules.core_attention = ModuleSpec(
        module=PECoreAttention,
        params={"pe": pe, "pe_options": cfg.pe},
    )
    return TransformerBlockSubmodules(
        layer_specs=[spec] * cfg.model.num_layers, layer_norm=SequenceParallelNorm
    )
