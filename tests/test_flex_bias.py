"""The FlexAttention bias kernel (``pe.bias_kernel=flex``) against the materialized bias
(the reference), forward only: torch 2.13 has no FlexAttention backward on CPU (eager or
compiled; ``tests/test_gpu.py`` has ALiBi's and T5's). fp32, so the two differ only by
summation order: attention outputs (of order 1) are held to 1e-5 absolute, a model's loss
to 1e-6 relative."""

import pytest
import torch

from cope_megatron.config import PEConfig
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape

# TP rank 1 of 2 (head_offset 6 of 12), GQA 6 query heads over 2 kv heads, 200 tokens:
# not a multiple of the 128-token block, so the diagonal blocks are partial.
SHAPE = AttentionShape.of_rank(total_heads=12, total_kv_heads=4, head_dim=16, tp_size=2,
                               tp_rank=1)
LENGTH = 200


def attention(pe: str, kernel: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same parameters (T5's table, Kerple's, FIRE's MLP) for both
    return get_pe(pe).attention(SHAPE, PEConfig(bias_kernel=kernel)).eval()


@pytest.mark.parametrize("pe", ["alibi", "t5", "kerple", "fire"])
def test_flex_matches_materialized_bias(pe):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, SHAPE.num_heads, LENGTH, SHAPE.head_dim, generator=gen)
    k, v = (torch.randn(2, SHAPE.num_kv_heads, LENGTH, SHAPE.head_dim, generator=gen)
            for _ in range(2))
    flex, reference = attention(pe, "flex"), attention(pe, "materialized")
    with torch.no_grad():
        torch.testing.assert_close(flex(q, k, v), reference(q, k, v), rtol=0, atol=1e-5)



def test_the_switch_reaches_the_model(dist_cleanup):
    """``pe.bias_kernel`` from the config to every layer: a T5 GPT's held-out loss."""
    from cope_megatron.config import load_config
    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.model.gpt import build_gpt, lm_loss

    init_distributed(1)
    tokens = torch.randint(0, 100, (2, 149), generator=torch.Generator().manual_seed(0))
    losses = {}
    for kernel in ("flex", "materialized"):
        cfg = load_config(["model.pe=t5", "model.num_layers=2", "model.hidden_size=32",
                           "model.num_attention_heads=4", "model.num_query_groups=2",
                           "model.seq_length=148", f"pe.bias_kernel={kernel}"])
        seed_everything(0)
        model = build_gpt(cfg, get_pe("t5"), 100).eval()
        with torch.no_grad():
            losses[kernel] = lm_loss(model, tokens)
    torch.testing.assert_close(losses["flex"], losses["materialized"], rtol=1e-6, atol=0)


def test_auto_is_materialized_until_flipped_and_never_with_dropout(monkeypatch):
    from cope_megatron.pe import base

    assert not base.uses_flex("auto", "cuda", 0.0) and not base.uses_flex("auto", "cpu", 0.0)
    monkeypatch.setattr(base, "AUTO_FLEX_ON_CUDA", True)
    assert base.uses_flex("auto", "cuda", 0.0)
    assert not base.uses_flex("auto", "cuda", 0.1) and not base.uses_flex("auto", "cpu", 0.0)
    assert base.uses_flex("flex", "cpu", 0.0) and not base.uses_flex("materialized", "cuda", 0)
