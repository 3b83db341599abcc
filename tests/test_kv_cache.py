"""The exported model's key/value cache (``hf/kv_cache.py``): for every PE in the registry
and the variants that change attention (RoPE scalings, dynamic NTK past its original
length, per-head CoPE tables, a PE schedule, length scaling, grouped queries, padding
refused), transformers' greedy ``generate`` with ``use_cache=True`` gives the tokens and,
at every step, the logits (fp32, 1e-5) of generation without a cache, and a prompt fed in
two chunks through the cache gives the logits of one forward."""

import pytest
import torch

from cope_megatron.hf.modeling_cope_megatron import CopeMegatronConfig, CopeMegatronForCausalLM
from cope_megatron.pe import REGISTRY

VARIANTS = {pe: {"pe": pe} for pe in sorted(REGISTRY)}
VARIANTS.update({
    "cope_per_head": {"pe": "cope", "cope_shared_table": False},
    "schedule": {"pe": "cope", "pe_schedule": ["rope", "cope", "fox"]},
    "length_scale": {"pe": "rope", "length_scale": "learned", "length_scale_s": 0.7},
    "gqa": {"pe": "cope_rope", "num_key_value_heads": 2, "normalization": "RMSNorm"},
    "rope_linear": {"pe": "rope", "rope_scaling_type": "linear", "rope_scaling_factor": 2.0},
    "rope_ntk": {"pe": "rope", "rope_scaling_type": "ntk", "rope_scaling_factor": 2.0},
    "rope_yarn": {"pe": "rope", "rope_scaling_type": "yarn", "rope_scaling_factor": 4.0},
    # past its 8 original positions, the base follows the length: recomputed, not cached
    "rope_dynamic": {"pe": "rope", "rope_scaling_type": "dynamic", "rope_scaling_factor": 2.0,
                     "rope_original_length": 8, "rope_percent": 0.5},
    "t5_short_buckets": {"pe": "t5", "t5_num_buckets": 8, "t5_max_distance": 12},
    "fire_low_threshold": {"pe": "fire", "fire_threshold_init": 4.0},
})
PROMPT, NEW = 6, 14


def tiny_model(**changes) -> CopeMegatronForCausalLM:
    """A seeded 2-layer model with every parameter drawn (zero-initialized tables too)."""
    config = CopeMegatronConfig(vocab_size=61, hidden_size=32, num_attention_heads=4,
                                max_position_embeddings=32, cope_npos_max=8,
                                fire_mlp_width=8, eos_token_id=None, **changes)
    torch.manual_seed(0)
    model = CopeMegatronForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "cope_table" in name else 0.3))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_recomputing_the_prefix(variant):
    model = tiny_model(**VARIANTS[variant])
    prompt = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    runs = {cache: model.generate(prompt, max_new_tokens=NEW, do_sample=False, use_cache=cache,
                                  output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=0, eos_token_id=None)
            for cache in (True, False)}
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    assert runs[True].sequences.shape[1] == PROMPT + NEW
    for step, (cached, recomputed) in enumerate(zip(runs[True].logits, runs[False].logits)):
        torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, step=step: f"step {step}: {m}")

    tokens = runs[True].sequences[:, :12]
    with torch.no_grad():
        whole = model(tokens).logits
        first = model(tokens[:, :5], use_cache=True)
        rest = model(tokens[:, 5:], cache=first.cache, use_cache=True)
    if variant != "rope_dynamic":  # its keys change with the length: not cacheable past 8
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), whole,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", ["fox", "cope"])
def test_beam_search_reorders_the_cache(pe):
    """Beam search reorders (and first repeats) the cache's rows: FoX's gates with them."""
    model = tiny_model(pe=pe)
    prompt = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    runs = [model.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False,
                           use_cache=cache, pad_token_id=0, eos_token_id=None,
                           return_dict_in_generate=True, output_scores=True)
            for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(runs[0].sequences_scores, runs[1].sequences_scores,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", ["fox", "cope"])
def test_a_cropped_cache_continues_as_a_shorter_prompt(pe):
    """``crop`` (generate's rollback, assisted decoding) drops the last tokens' keys and
    FoX's gates with them."""
    model = tiny_model(pe=pe)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(tokens[:, :8], use_cache=True).cache
        cache.crop(-2)
        assert cache.get_seq_length() == 6
        resumed = model(tokens[:, 6:7], cache=cache, use_cache=True).logits
        whole = model(tokens[:, :7]).logits[:, -1:]
    torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-5)


def test_cache_is_used_where_it_is_exact_and_dropped_where_not():
    from cope_megatron.hf.kv_cache import generation_inputs

    model = tiny_model(pe="rope", rope_scaling_type="dynamic", rope_scaling_factor=2.0,
                       rope_original_length=8)
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        cache = model(tokens[:, :7], use_cache=True).cache
    within = generation_inputs(model.config, tokens[:, :8], cache, True, None)
    assert within["cache"] is cache and within["input_ids"].shape[1] == 1
    beyond = generation_inputs(model.config, tokens[:, :9], cache, True, None)
    assert beyond["cache"] is not cache and beyond["input_ids"].shape[1] == 9


def test_padding_is_refused():
    model = tiny_model(pe="alibi")
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model(torch.tensor([[0, 5, 6]]), attention_mask=mask)
