"""Parameters of a run's model, counted from the shapes Megatron-Core builds, per
tensor-parallel rank (vocabulary and column-parallel weights split, row-parallel biases and
norms replicated); a PE's own parameters come from building its attention on the meta
device."""

from __future__ import annotations

import torch

from cope_megatron.config import Config, padded_vocab_size
from cope_megatron.pe import PositionEncoding
from cope_megatron.pe.base import AttentionShape


def pe_parameters(cfg: Config, pe: PositionEncoding, tensor: int = 1) -> int:
    """Parameters of one layer's PE attention on one TP rank (CoPE's table, T5's buckets),
    counted on the meta device."""
    m = cfg.model
    shape = AttentionShape.of_rank(
        total_heads=m.num_attention_heads, total_kv_heads=m.query_groups, head_dim=m.head_dim,
        tp_size=tensor, init_std=m.init_method_std)
    with torch.device("meta"):
        module = pe.attention(shape, cfg.pe)
    return sum(p.numel() for p in module.parameters())


def parameters(cfg: Config, pe: PositionEncoding, vocab_size: int, tensor: int = 1) -> int:
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
        + pe_parameters(cfg, pe, t)
        + ((h + 1) * m.num_attention_heads // t if pe.token_gate else 0)  # gate projection
    )
    vocab = padded_vocab_size(vocab_size, t) // t * h
    # A fixed encoding replaces GPTModel's learned table with a module without parameters.
    learned = (m.seq_length * h if pe.gpt_position_embedding == "learned_absolute"
               and pe.position_embedding is None else 0)
    return (m.num_layers * layer + norm + vocab * (1 if not m.untie_embeddings else 2)
            + learned)
