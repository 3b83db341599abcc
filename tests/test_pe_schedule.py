"""``model.pe_schedule``: each layer its own PE from a repeating pattern. The model's
function is checked against the readable reference model in tests/test_export.py
("schedule" variant) and under TP, SP and CP in tests/test_parallel.py; the estimate in
tests/test_estimate.py. Here: which layer gets what, the errors, and what a resume compares."""

import pytest

from cope_megatron.config import ConfigError, load_config
from cope_megatron.pe import label, model_pe
from cope_megatron.startup import check
from cope_megatron.training.resume import _refused


def test_each_layer_gets_its_entry_of_the_repeating_pattern(dist_cleanup):
    from cope_megatron.distributed.parallel import init_distributed
    from cope_megatron.model.gpt import build_gpt
    from cope_megatron.model.layer_spec import UnrotatedSelfAttention
    from cope_megatron.pe.alibi import AlibiAttention
    from cope_megatron.pe.base import CausalAttention
    from cope_megatron.pe.cope import CoPEAttention

    cfg = load_config(["model.pe=rope", "model.pe_schedule=[rope,cope,alibi]",
                       "model.num_layers=5", "model.hidden_size=32"])
    init_distributed(1)
    layers = build_gpt(cfg, check(cfg, 1, data=False), 100).decoder.layers
    attention = [type(layer.self_attention.core_attention.attention) for layer in layers]
    assert attention == [CausalAttention, CoPEAttention, AlibiAttention, CausalAttention,
                         CoPEAttention]
    # The rotary tables reach the rope layers only.
    unrotated = [isinstance(layer.self_attention, UnrotatedSelfAttention) for layer in layers]
    assert unrotated == [False, True, True, False, True]


def test_a_schedule_without_rotation_builds_no_rotary_tables():
    cfg = load_config(["model.pe=cope", "model.pe_schedule=[cope,nope]"])
    pe = model_pe(cfg.model)
    assert pe.gpt_position_embedding == "none" and not pe.rotary and pe.uses_cope_op
    assert label(cfg) == "[cope,nope]" == pe.name


@pytest.mark.parametrize("overrides, message", [
    (["model.pe_schedule=[rope,fancy]"], "^model.pe_schedule: unknown position encoding"),
    (["model.pe_schedule=[rope,learned]"], "^model.pe_schedule: learned adds positions"),
    (["model.pe_schedule=[rope,sinusoidal]"], "^model.pe_schedule: sinusoidal adds positions"),
    (["model.pe=alibi", "model.pe_schedule=[rope,nope]"], "^model.pe: alibi is not in"),
])
def test_impossible_schedules_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(load_config(overrides), 1, data=False)


def test_a_scheduled_pe_gets_its_own_start_up_check():
    cfg = load_config(["model.pe=rope", "model.pe_schedule=[rope,cope]",
                       "model.attention_dropout=0.1"])
    with pytest.raises(ConfigError, match="^model.attention_dropout: the CoPE op"):
        check(cfg, 1, data=False)


@pytest.mark.parametrize("overrides, key, refused", [
    # cope_rope reads pe.rope as well as pe.cope: neither may change under it.
    (["model.pe=cope_rope"], "pe.rope.base", True),
    (["model.pe=cope_rope"], "pe.cope.npos_max", True),
    (["model.pe=cope"], "pe.rope.base", False),
    (["model.pe=cope"], "pe.t5.num_buckets", False),
    # A schedule reads the options of every PE in it.
    (["model.pe=rope", "model.pe_schedule=[rope,cope]"], "pe.cope.npos_max", True),
    (["model.pe=rope", "model.pe_schedule=[rope,cope]"], "pe.alibi.slopes", False),
    # Options that belong to no PE are compared as the table says.
    (["model.pe=rope"], "pe.cope.impl", False),
])
def test_a_resume_compares_the_options_of_every_pe_the_model_reads(overrides, key, refused):
    cfg = load_config(overrides)
    assert (_refused({key: ["then", "now"]}, cfg) == [key]) is refused


def test_a_changed_schedule_is_refused_and_compares_every_pe_option():
    cfg = load_config(["model.pe=rope", "model.pe_schedule=[rope,nope]"])
    changed = {"model.pe_schedule": [["rope", "cope"], ["rope", "nope"]],
               "pe.cope.npos_max": [8, 64]}
    assert _refused(changed, cfg) == ["model.pe_schedule", "pe.cope.npos_max"]


def test_a_token_gate_layer_in_a_rotary_model_keeps_its_gate_and_drops_the_tables(
        dist_cleanup):
    from cope_megatron.distributed.parallel import init_distributed
    from cope_megatron.model.gpt import build_gpt
    from cope_megatron.model.layer_spec import UnrotatedSelfAttention
    from cope_megatron.model.token_gate import TokenGateSelfAttention

    cfg = load_config(["model.pe=rope", "model.pe_schedule=[rope,fox]",
                       "model.hidden_size=32"])
    init_distributed(1)
    rope, fox = build_gpt(cfg, check(cfg, 1, data=False), 100).decoder.layers
    assert not isinstance(rope.self_attention, (UnrotatedSelfAttention, TokenGateSelfAttention))
    assert isinstance(fox.self_attention, UnrotatedSelfAttention)
    assert isinstance(fox.self_attention, TokenGateSelfAttention)
