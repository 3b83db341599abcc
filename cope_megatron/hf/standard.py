"""Standard ``transformers`` architectures that compute exactly our function, for the runs
where one exists: then the export needs no remote code for the model.

- RoPE → GPT-NeoX with sequential residuals and exact GELU: its fused QKV is laid out
  per head as [q, k, v], which is Megatron's layout with one query head per group, and it
  rotates halves (not pairs) of its first ``partial_rotary_factor`` of each head as
  Megatron does. ``pe.rope_scaling`` maps to its ``rope_parameters`` (below): NTK-aware
  as the scaled base, linear, dynamic and YaRN as Hugging Face's own types. p-RoPE
  (``pe.rope.keep_frequencies`` < 1) has no Hugging Face type that GPT-NeoX applies: such
  runs use ``modeling_cope_megatron``.
- learned absolute positions → GPT-2 with exact GELU: its Conv1D weights are our linear
  weights transposed, and its QKV is [all q, all k, all v].

Both need LayerNorm and one key/value head per query head; GPT-2 also ties its output
layer to the embeddings. Any other run uses ``modeling_cope_megatron``.
"""

from __future__ import annotations

import re

import torch

from cope_megatron.config import Config
from cope_megatron.pe import ModelPE
from cope_megatron.pe.rope_scaling import (
    ntk_base,
    original_length,
    rotary_dim,
    scaling_type,
    yarn_attention_scale,
)


def standard_architecture(cfg: Config, pe: ModelPE) -> str | None:
    """The PE's ``hf_architecture`` where the rest of the model fits it (LayerNorm, one
    key/value head per query head, no length scale, and for GPT-2 tied embeddings), else
    None."""
    m = cfg.model
    if (m.normalization != "LayerNorm" or m.query_groups != m.num_attention_heads
            or cfg.pe.length_scale.type != "none"):
        return None
    if pe.hf_architecture == "gpt2" and m.untie_embeddings:
        return None
    if pe.rotary and cfg.pe.rope.keep_frequencies < 1:
        return None
    return pe.hf_architecture


def rope_parameters(cfg: Config) -> tuple[dict, int]:
    """Hugging Face's ``rope_parameters`` for the run's RoPE, and the
    ``max_position_embeddings`` they need (dynamic NTK reads L₀ there).

    Hugging Face's ``dynamic`` keeps the frequencies of the longest forward seen until one
    shorter than L₀ comes, where ours follow each forward's length: the two agree on every
    forward at least as long as those before it, or shorter than L₀."""
    r, s, m = cfg.pe.rope, cfg.pe.rope_scaling, cfg.model
    kind, original = scaling_type(cfg), original_length(cfg)
    base = {"rope_theta": r.base, "partial_rotary_factor": r.percent}
    if kind == "ntk":
        dim = rotary_dim(m.head_dim, r.percent)
        return {**base, "rope_type": "default",
                "rope_theta": ntk_base(r.base, s.factor, dim)}, m.seq_length
    if kind == "none":
        return {**base, "rope_type": "default"}, m.seq_length
    if kind == "dynamic":
        return {**base, "rope_type": "dynamic", "factor": s.factor}, original
    if kind == "linear":
        return {**base, "rope_type": "linear", "factor": s.factor}, m.seq_length
    # YaRN: the temperature given outright (Hugging Face reads mscale only beside
    # mscale_all_dim).
    return {**base, "rope_type": "yarn", "factor": s.factor,
            "original_max_position_embeddings": original, "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow, "truncate": True,
            "attention_factor": yarn_attention_scale(s.factor, s.mscale)}, m.seq_length


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict:
    """``state`` with each name rewritten by the first (pattern, replacement) rule whose
    pattern matches it; ValueError for a name no rule matches."""
    out = {}
    for name, tensor in state.items():
        rule = next((r for r in rules if re.match(r[0], name)), None)
        if rule is None:
            raise ValueError(f"no Hugging Face name for parameter {name!r}")
        out[re.sub(*rule, name)] = tensor
    return out


LAYER_PARAMETERS = ("input_layernorm", "pre_mlp_layernorm", "self_attention.linear_qkv",
                    "self_attention.linear_proj", "linear_fc1", "linear_fc2")
"""Our per-layer module names, in the order each architecture's table lists its own."""


def _layer_rules(prefix: str, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """``rename`` rules from our layer modules to ``prefix``.N.<name>, one name each."""
    return [(rf"^layers\.(\d+)\.{re.escape(ours)}\.", rf"{prefix}.\1.{theirs}.")
            for ours, theirs in zip(LAYER_PARAMETERS, names, strict=True)]


def gpt_neox(cfg: Config, vocab_size: int, state: dict[str, torch.Tensor]):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = cfg.model
    rope, max_positions = rope_parameters(cfg)
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_size, hidden_act="gelu",
        max_position_embeddings=max_positions, layer_norm_eps=1e-5,
        use_parallel_residual=False, attention_bias=True, rope_parameters=rope,
        tie_word_embeddings=not m.untie_embeddings, bos_token_id=1, eos_token_id=2)
    model = GPTNeoXForCausalLM(config)
    weights = rename(state, [
        (r"^word_embeddings\.", "gpt_neox.embed_in."),
        (r"^final_layernorm\.", "gpt_neox.final_layer_norm."),
        (r"^output_layer\.", "lm_head."),
        *_layer_rules("gpt_neox.layers", (
            "input_layernorm", "post_attention_layernorm", "attention.query_key_value",
            "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    ])
    weights.setdefault("lm_head.weight", weights["gpt_neox.embed_in.weight"])  # tied
    model.load_state_dict(weights, strict=True)
    return model


def _qkv_heads_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Megatron's [heads, (q, k, v), d] rows -> GPT-2's [(q, k, v), heads, d]."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def gpt2(cfg: Config, vocab_size: int, state: dict[str, torch.Tensor]):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=m.hidden_size, n_layer=m.num_layers,
        n_head=m.num_attention_heads, n_inner=m.ffn_size,
        n_positions=m.seq_length, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config)
    state = dict(state)
    for name in [n for n in state if "linear_qkv" in n]:
        state[name] = _qkv_heads_to_blocks(state[name], m.num_attention_heads)
    weights = rename(state, [
        (r"^word_embeddings\.", "transformer.wte."),
        (r"^position_embeddings\.", "transformer.wpe."),
        (r"^final_layernorm\.", "transformer.ln_f."),
        *_layer_rules("transformer.h", (
            "ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    ])
    # Conv1D stores [in, out]: our linear weights transposed.
    weights = {k: v.t().contiguous() if k.endswith(".weight") and v.dim() == 2
               and not k.startswith(("transformer.wte", "transformer.wpe")) else v
               for k, v in weights.items()}
    weights["lm_head.weight"] = weights["transformer.wte.weight"]
    model.load_state_dict(weights, strict=True)
    return model


BUILDERS = {"gpt_neox": gpt_neox, "gpt2": gpt2}
