"""The transformer layer specs for a model's position encoding: Megatron's local GPT layer
with our core attention and sequence-parallel-capable norms, one spec per layer's PE."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from cope_megatron.config import Config
from cope_megatron.model.attention import PECoreAttention
from cope_megatron.model.norm import SequenceParallelNorm
from cope_megatron.model.token_gate import TokenGateSelfAttention
from cope_megatron.pe import ModelPE, PositionEncoding


class UnrotatedSelfAttention(SelfAttention):
    """Self-attention of a layer whose PE does not rotate, in a model where other layers
    do: GPTModel hands every layer its rotary tables, and this layer drops them."""

    def forward(self, *args, **kwargs):
        for name in ("rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
                     "rotary_pos_cos_sin"):
            kwargs.pop(name, None)
        return super().forward(*args, **kwargs)


class UnrotatedTokenGateSelfAttention(UnrotatedSelfAttention, TokenGateSelfAttention):
    """A token-gate attention (FoX) in a model whose other layers rotate."""


def get_layer_spec(cfg: Config, pe: ModelPE) -> TransformerBlockSubmodules:
    """Layer specs for every layer plus the final norm, as GPTModel accepts them."""
    layers = pe.per_layer(cfg.model.num_layers)
    specs = {layer_pe: _layer_spec(cfg, layer_pe, drop_rotary=pe.rotary and not layer_pe.rotary)
             for layer_pe in dict.fromkeys(layers)}
    return TransformerBlockSubmodules(layer_specs=[specs[layer_pe] for layer_pe in layers],
                                      layer_norm=SequenceParallelNorm)


def _layer_spec(cfg: Config, pe: PositionEncoding, drop_rotary: bool) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization)
    layer = spec.submodules
    layer.input_layernorm = SequenceParallelNorm
    layer.pre_mlp_layernorm = SequenceParallelNorm
    if pe.token_gate:
        layer.self_attention.module = (UnrotatedTokenGateSelfAttention if drop_rotary
                                       else TokenGateSelfAttention)
    elif drop_rotary:
        layer.self_attention.module = UnrotatedSelfAttention
    layer.self_attention.submodules.core_attention = ModuleSpec(
        module=PECoreAttention,
        params={"pe": pe, "pe_options": cfg.pe, "train_length": cfg.model.seq_length},
    )
    return spec
