"""RoPE's frequencies for the rotary PEs (``rope``, ``cope_rope``): partial rotary, p-RoPE
and context-extension scaling, from ``pe.rope`` and ``pe.rope_scaling``.

Megatron-Core computes most of them, and is used for those:
- partial rotary (``rotary_percent``; GPT-NeoX's ``rotary_pct``): the first
  d = ⌊head_dim·percent⌋ dimensions are rotated at θ_i = b^(−2i/d), the rest pass;
- linear position interpolation (Chen et al. 2023, arXiv 2306.15595, eq. 3): positions
  m → m/s (``seq_len_interpolation_factor``);
- YaRN (Peng et al. 2023, arXiv 2309.00071, §3.2–3.4; ``YarnRotaryEmbedding``):
  "NTK-by-parts" θ'_i = (1 − γ_i)·θ_i/s + γ_i·θ_i with the ramp γ over r_i = L₀/λ_i from
  α = ``beta_slow`` to β = ``beta_fast``, and q, k scaled by √(1/t) = 0.1·ln s + 1
  (eq. 22), which Megatron's attention applies from the ``yarn_*`` fields of its config.
  The ramp is linear in the dimension index between the (rounded) dimensions where
  r = β and r = α, as in the authors' code, Megatron and Hugging Face (the paper's eq. 18
  writes it linear in r; the code is what every YaRN checkpoint was made with).

Written here because Megatron has none of them:
- NTK-aware scaling (bloc97 2023; YaRN §3.1, eq. 14–16): the base b' = b·s^(d/(d−2)),
  which stretches the lowest frequency s-fold and keeps the highest;
- dynamic NTK (YaRN §3.3; Hugging Face's ``dynamic``): the same with the factor following
  each forward's length L, b' = b·(s·L/L₀ − (s − 1))^(d/(d−2)) when L > L₀, else b;
- p-RoPE (Barbero et al. 2024, arXiv 2410.06205, §6): only the ⌊p·d/2⌋ highest
  frequencies are kept, the lowest set to 0 (those dimensions carry no position), as the
  authors' code does (it pads the timescales with ∞).

Megatron's ``YarnRotaryEmbedding`` sizes its frequencies by the whole head whatever
``rotary_percent``; it is built with the rotated dimensions as its head, so that partial
YaRN is Hugging Face's (d = head_dim·partial_rotary_factor). A factor of 1 is plain RoPE
(dynamic NTK: up to L₀; beyond it, Hugging Face's ``dynamic`` with factor 1 still grows
the base, and so does this).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    YarnRotaryEmbedding,
)
from megatron.core.transformer import TransformerConfig
from torch import Tensor

from cope_megatron.config import Config, ConfigError

if TYPE_CHECKING:
    from cope_megatron.pe import ModelPE


def rotary_dim(head_dim: int, percent: float) -> int:
    """Dimensions rotated per head (Megatron's and Hugging Face's rounding)."""
    return int(head_dim * percent)


def kept_frequencies(dim: int, keep: float) -> int:
    """p-RoPE: the frequencies that stay, of the dim/2 (the authors' ⌊p·d/2⌋)."""
    return int(keep * dim // 2)


def original_length(cfg: Config) -> int:
    """L₀: the length the model was trained at (``pe.rope_scaling.original_length``)."""
    return cfg.pe.rope_scaling.original_length or cfg.model.seq_length


def scaling_type(cfg: Config) -> str:
    """``pe.rope_scaling.type``, or "none" where its factor leaves RoPE as it is (every
    type but dynamic NTK at factor 1)."""
    s = cfg.pe.rope_scaling
    return "none" if s.factor == 1 and s.type != "dynamic" else s.type


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base b·s^(d/(d−2)) for ``dim`` rotated dimensions."""
    return base * factor ** (dim / (dim - 2))


def yarn_attention_scale(factor: float, mscale: float = 1.0) -> float:
    """√(1/t) = 0.1·mscale·ln s + 1 (YaRN eq. 22), by which q and k are multiplied."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """RoPE whose base follows the length of each forward (dynamic NTK): Megatron's
    rotary module with its frequencies computed per length (its forward caches them per
    length too)."""

    def __init__(self, dim: int, base: float, factor: float, original: int,
                 kept: int) -> None:
        super().__init__(kv_channels=dim, rotary_percent=1.0, rotary_base=base,
                         use_cpu_initialization=True)
        self.dim, self.base, self.factor, self.original, self.kept = (
            dim, base, factor, original, kept)

    def inverse_frequencies(self, length: int) -> Tensor:
        """θ_i at a forward of ``length`` tokens."""
        base = self.base
        if length > self.original:
            scale = self.factor * length / self.original - (self.factor - 1)
            base = base * scale ** (self.dim / (self.dim - 2))
        inv = 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                          device=self.inv_freq.device) / self.dim)
        inv[self.kept:] = 0
        return inv

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> Tensor:
        inv = self.inverse_frequencies(max_seq_len + offset)
        seq = torch.arange(max_seq_len, device=inv.device, dtype=inv.dtype) + offset
        return torch.outer(seq, inv)


def rotary_embedding(cfg: Config) -> RotaryEmbedding:
    """The rotary module of a rotary PE's GPT, built on the CPU (Megatron moves it to the
    device at the first forward)."""
    r, s, m = cfg.pe.rope, cfg.pe.rope_scaling, cfg.model
    dim = rotary_dim(m.head_dim, r.percent)
    kept = kept_frequencies(dim, r.keep_frequencies)
    kind = scaling_type(cfg)
    if kind == "dynamic":
        return DynamicNTKRotaryEmbedding(dim, r.base, s.factor, original_length(cfg), kept)
    if kind == "yarn":
        module = YarnRotaryEmbedding(
            kv_channels=dim, rotary_base=r.base, use_cpu_initialization=True,
            scaling_factor=s.factor, original_max_position_embeddings=original_length(cfg),
            beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=0.0)
        frequencies = (module.inv_freq_extra, module.inv_freq_inter)
    else:
        module = RotaryEmbedding(
            kv_channels=dim, rotary_percent=1.0, use_cpu_initialization=True,
            rotary_base=ntk_base(r.base, s.factor, dim) if kind == "ntk" else r.base,
            seq_len_interpolation_factor=s.factor if kind == "linear" else None)
        frequencies = (module.inv_freq,)
    for inv in frequencies:
        inv[kept:] = 0
    if kind == "yarn" and kept < dim // 2:  # its constructor made tables before p-RoPE
        module._set_cos_sin_cache(module.max_seq_len_cached, 0, module.dtype_cached)
        module.forward.cache_clear()
    return module


def gpt_position_embedding(cfg: Config, pe: ModelPE) -> str:
    """GPTModel's ``position_embedding_type``: its YaRN path returns the table with its
    temperature, the RoPE path the table alone."""
    return "yarn" if pe.rotary and scaling_type(cfg) == "yarn" else pe.gpt_position_embedding


def set_yarn_fields(config: TransformerConfig, cfg: Config) -> None:
    """The ``yarn_*`` fields GPTModel's YaRN path and Megatron's attention read (the
    latter to scale q and k by the temperature); set only for YaRN."""
    s = cfg.pe.rope_scaling
    config.yarn_rotary_scaling_factor = s.factor
    config.yarn_original_max_position_embeddings = original_length(cfg)
    config.yarn_beta_fast = s.beta_fast
    config.yarn_beta_slow = s.beta_slow
    config.yarn_mscale = s.mscale
    config.yarn_mscale_all_dim = 0.0
    config.yarn_correction_range_round_to_int = True


def check(cfg: Config, pe: ModelPE) -> None:
    """``pe.rope`` and ``pe.rope_scaling`` that cannot run (ConfigError naming the key)."""
    r, s, m = cfg.pe.rope, cfg.pe.rope_scaling, cfg.model
    if not pe.rotary:
        if s.type != "none":
            raise ConfigError(f"pe.rope_scaling.type: {s.type} scales rotary embeddings, and "
                              f"model.pe={pe.name} has none; use a rotary PE (rope, "
                              "cope_rope) or set pe.rope_scaling.type=none")
        return
    if not 0 < r.percent <= 1:
        raise ConfigError(f"pe.rope.percent: must be in (0, 1], got {r.percent}")
    dim = rotary_dim(m.head_dim, r.percent)
    if dim < 4 or dim % 2:
        raise ConfigError(f"pe.rope.percent: {r.percent} of head dimension "
                          f"{m.head_dim} rotates {dim} dimensions; it must be an "
                          "even number, at least 4")
    if not 0 < r.keep_frequencies <= 1:
        raise ConfigError(f"pe.rope.keep_frequencies: must be in (0, 1], got "
                          f"{r.keep_frequencies}")
    if s.factor < 1:
        raise ConfigError(f"pe.rope_scaling.factor: must be at least 1 (it extends the "
                          f"context), got {s.factor}")
    if s.type == "dynamic" and cfg.data.document_boundaries:
        raise ConfigError("pe.rope_scaling.type: dynamic NTK sets its base from the length "
                          "of the whole sequence, which data.document_boundaries splits into "
                          "documents; use yarn or ntk, or data.document_boundaries=false")
    if s.original_length is not None and s.original_length < 1:
        raise ConfigError(f"pe.rope_scaling.original_length: must be at least 1, got "
                          f"{s.original_length}")
    if not 0 < s.beta_slow < s.beta_fast:
        raise ConfigError(f"pe.rope_scaling.beta_fast, beta_slow: need 0 < beta_slow < "
                          f"beta_fast, got {s.beta_slow} and {s.beta_fast}")
    if s.mscale < 0:
        raise ConfigError(f"pe.rope_scaling.mscale: must be 0 or more, got {s.mscale}")
