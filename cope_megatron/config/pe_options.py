"""The ``pe`` section of the run configuration: each PE's own options and those that
apply to every PE. Which options a PE reads is its registry entry's ``options``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True, slots=True)
class RopeOptions:
    base: float = 10000.0
    """RoPE frequency base (Su et al. 2021, arXiv 2104.09864)."""
    percent: float = 1.0
    """Partial rotary: the fraction of each head's dimensions rotated, the first ones
    (GPT-NeoX's ``rotary_pct``, Megatron's ``rotary_percent``); the rest carry no position.
    Frequencies span the whole range over the rotated dimensions."""
    keep_frequencies: float = 1.0
    """p-RoPE (Barbero et al. 2024, arXiv 2410.06205): the fraction p of the rotary
    frequencies kept, the highest; the lowest are set to 0, so their dimensions carry no
    position. 1: plain RoPE."""


@dataclass(kw_only=True, slots=True)
class RopeScalingOptions:
    type: Literal["none", "linear", "ntk", "dynamic", "yarn"] = "none"
    """How RoPE reaches beyond ``original_length`` (``pe/rope_scaling.py``): linear position
    interpolation (Chen et al. 2023, arXiv 2306.15595), NTK-aware base scaling, dynamic NTK
    (the factor follows each forward's length), YaRN (Peng et al. 2023, arXiv 2309.00071).
    Applies to ``rope`` and ``cope_rope``; ``eval`` takes it as an override of a trained run."""
    factor: float = 1.0
    """The scale s (≥ 1): the context is meant to reach s × ``original_length`` (dynamic:
    the base grows with each forward's length L as (s·L/L₀ − s + 1)^(d/(d−2)), as in
    Hugging Face's ``dynamic``; 1: plain RoPE for every type)."""
    original_length: int | None = None
    """The length the model was trained at; None: ``model.seq_length``."""
    beta_fast: float = 32.0
    """YaRN: dimensions turning more than this many times over ``original_length`` keep
    their frequency (the ramp's β, paper §3.2)."""
    beta_slow: float = 1.0
    """YaRN: dimensions turning fewer times are interpolated by the factor (the ramp's α)."""
    mscale: float = 1.0
    """YaRN: q and k are scaled by 0.1·mscale·ln s + 1, the square root of the attention
    temperature 1/t (paper eq. 22; 1 as in the paper)."""


@dataclass(kw_only=True, slots=True)
class CopeOptions:
    npos_max: int = 64
    """Number of position embeddings; positions are clamped to npos_max − 1 (paper §3)."""
    shared_table: bool = True
    """One table per layer shared by all heads (authors' code) or one per head."""
    impl: Literal["auto", "reference", "chunked", "triton"] = "auto"


@dataclass(kw_only=True, slots=True)
class AlibiOptions:
    slopes: Literal["geometric"] = "geometric"
    """Slopes 2^(−8i/n) per head (Press et al. 2022, arXiv 2108.12409)."""


@dataclass(kw_only=True, slots=True)
class T5Options:
    num_buckets: int = 32
    """Relative-position buckets (Raffel et al. 2020, §2.1)."""
    max_distance: int = 128


@dataclass(kw_only=True, slots=True)
class FireOptions:
    mlp_width: int = 32
    """Hidden width of f_θ, the 2-layer ReLU MLP from the interpolated distance to a bias
    per head (Li et al. 2023, arXiv 2310.04418: 32)."""
    c_init: float = 0.1
    """Initial c of ψ(x) = log(c·x + 1), learned (the paper's code: 0.1)."""
    threshold_init: float = 512.0
    """Initial threshold L of the normalizer ψ(max(L, i)), learned as a multiplier of it
    (the paper's code: 512)."""


@dataclass(kw_only=True, slots=True)
class KerpleOptions:
    variant: Literal["log", "power"] = "log"
    """−r₁·log(1 + r₂·|i − j|) or −r₁·|i − j|^r₂ (Chi et al. 2022, arXiv 2205.09921)."""
    max_exponent: float = 2.0
    """Upper bound of the power variant's learned exponent r₂, in (0, 2]: the power kernel
    is conditionally positive definite only for 0 < r₂ ≤ 2."""


@dataclass(kw_only=True, slots=True)
class LengthScaleOptions:
    type: Literal["none", "fixed", "learned"] = "none"
    """Length-scaled softmax with any PE: each query row's logits times s·ln n (n: the keys
    it sees); s per head, ``fixed`` or ``learned`` (``pe/length_scale.py``)."""
    s: float | None = None
    """s (``learned``: its initial value); None: 1/ln(model.seq_length), which leaves the
    last row of a training-length sequence as it was."""


@dataclass(kw_only=True, slots=True)
class PEConfig:
    rope: RopeOptions = field(default_factory=RopeOptions)
    rope_scaling: RopeScalingOptions = field(default_factory=RopeScalingOptions)
    length_scale: LengthScaleOptions = field(default_factory=LengthScaleOptions)
    cope: CopeOptions = field(default_factory=CopeOptions)
    alibi: AlibiOptions = field(default_factory=AlibiOptions)
    t5: T5Options = field(default_factory=T5Options)
    fire: FireOptions = field(default_factory=FireOptions)
    kerple: KerpleOptions = field(default_factory=KerpleOptions)
    bias_kernel: Literal["auto", "flex", "materialized"] = "auto"
    """How a bias PE (ALiBi, T5, Kerple, FIRE) attends on one context-parallel rank:
    ``materialized`` hands SDPA an [s, s] bias (the reference; off the flash backend),
    ``flex`` runs FlexAttention with the bias read per (head, distance), or for FIRE
    computed per score (compiled on CUDA; no dropout; on CPU forward only), ``auto`` is
    materialized until the GPU suite has measured flex (``AUTO_FLEX_ON_CUDA`` in
    ``pe/base.py``), and always with dropout."""
