"""Parameters of a run's model, counted from the shapes Megatron-Core builds, per
tensor-parallel rank (vocabulary and column-parallel weights split, row-parallel biases and
norms replicated); a PE's own parameters come from building its attention on the meta
device."""

from __future__ import annotations

import torch

from cope_megatron.config import Config, padded_vocab_size
from cope_megatron.pe import ModelPE, PositionEncoding
from cope_megatron.pe.base import AttentionShape
from cope_megatron.pe.length_scale import LengthScale


def pe_parameters(cfg: Config, pe: PositionEncoding, tensor: int = 1) -> int:
    """Parameters of one layer's PE on one TP rank (CoPE's table, T5's buckets, a learned
    length scale: its attention, counted on the meta device; FoX's gate projection)."""
    m = cfg.model
    shape = AttentionShape.of_rank(
        total_heads=m.num_attention_heads, total_kv_heads=m.query_groups, head_dim=m.head_dim,
        tp_size=tensor, init_std=m.init_method_std)
    with torch.device("meta"):
        modules = [pe.attention(shape, cfg.pe)]
        if cfg.pe.length_scale.type != "none":
            modules.append(LengthScale(shape, cfg.pe.length_scale, m.seq_length))
    gate = (m.hidden_size + 1) * m.num_attention_heads // tensor if pe.token_gate else 0
    return gate + sum(p.numel() for module in modules for p in module.parameters())


def parameters(cfg: Config, pe: ModelPE, vocab_size: int, tensor: int = 1) -> int:
    """Parameters held by one TP rank (all of them for ``tensor`` = 1)."""
    m = cfg.model
    h, t = m.hidden_size, tensor
    head_dim, groups, ffn = m.head_dim, m.query_groups, m.ffn_size
    qkv_out = (m.num_attention_heads + 2 * groups) * head_dim
    norm = 2 * h if m.normalization == "LayerNorm" else h
    layer = (
        2 * norm
        + (h * qkv_out + qkv_out) // t  # column parallel: weight and bias split
        + m.num_attention_heads * head_dim * h // t + h  # row parallel: bias replicated
        + (h * ffn + ffn) // t
        + ffn * h // t + h
    )
    vocab = padded_vocab_size(vocab_size, t) // t * h
    # A fixed encoding replaces GPTModel's learned table with a module without parameters.
    learned = (m.seq_length * h if pe.gpt_position_embedding == "learned_absolute"
               and pe.position_embedding is None else 0)
    pes = sum(pe_parameters(cfg, layer_pe, t) for layer_pe in pe.per_layer(m.num_layers))
    return (m.num_layers * layer + pes + norm + vocab * (1 if not m.untie_embeddings else 2)
            + learned)
