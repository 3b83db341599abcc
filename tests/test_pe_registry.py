"""Every registered PE builds, runs forward, trains, and runs (or clearly refuses) beyond
its training length. A new PE is covered by registering it."""

import pytest
import torch

from cope_megatron.config import ConfigError, load_config
from cope_megatron.distributed.parallel import init_distributed, seed_everything
from cope_megatron.model.gpt import BeyondTrainingLengthError, build_gpt, lm_loss
from cope_megatron.pe import REGISTRY, get_pe

VOCAB = 100
SEQ = 16


def tiny_model(pe: str):
    cfg = load_config([f"model.pe={pe}", "model.num_layers=2", "model.hidden_size=32",
                       "model.num_attention_heads=4", f"model.seq_length={SEQ}",
                       "pe.cope.npos_max=8"])
    init_distributed(1)
    seed_everything(0)
    return build_gpt(cfg, get_pe(cfg.model.pe), VOCAB)


@pytest.mark.parametrize("pe", sorted(REGISTRY))
def test_every_pe_builds_runs_and_trains(pe, dist_cleanup):
    model = tiny_model(pe)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = lm_loss(model, tokens)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses  # same batch thrice: loss must fall

    long = torch.randint(0, VOCAB, (1, 4 * SEQ + 1), generator=gen)
    if get_pe(pe).extrapolates:
        with torch.no_grad():
            assert torch.isfinite(lm_loss(model, long))
    else:
        with pytest.raises(BeyondTrainingLengthError, match="cannot extrapolate"):
            lm_loss(model, long)


def test_unknown_pe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="^model.pe: .*'rope'"):
        get_pe("fancy")


def test_rope_is_relative():
    """RoPE logits depend only on offsets: shifting every position id leaves the loss."""
    import torch

    model = tiny_model("rope")
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        a = model(inputs, pos, None, labels=labels)
        b = model(inputs, pos + 5, None, labels=labels)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
