"""``pe.length_scale``: row i's logits times s_h·ln(i + 1) (Scalable-Softmax), against the
formula in float64, with its gradient. The whole model against the readable reference
model: tests/test_export.py ("length_scale" variant); under TP, SP and CP (global row
positions): tests/test_parallel.py; the estimate: tests/test_estimate.py."""

import math

import pytest
import torch

from cope_megatron.config import ConfigError, LengthScaleOptions, PEConfig, load_config
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape
from cope_megatron.pe.length_scale import LengthScale
from cope_megatron.startup import check

SHAPE = AttentionShape.of_rank(total_heads=4, total_kv_heads=4, head_dim=8)


def scaled_softmax_attention(q, k, v, s, scale):
    """softmax_j(s_h · ln n_i · scale · q_i·k_j) v_j, n_i = i + 1 keys, materialized."""
    n = q.shape[2]
    logits = scale * q @ k.transpose(-1, -2)
    rows = torch.log(torch.arange(1, n + 1, dtype=q.dtype))
    logits = logits * (s[:, None] * rows)[None, :, :, None]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_scaled_queries_give_the_length_scaled_softmax(kind):
    torch.manual_seed(0)
    scale_mod = LengthScale(SHAPE, LengthScaleOptions(type=kind, s=0.43), train_length=64)
    scale_mod.s.data = torch.tensor([0.43, 0.2, 0.9, 1.5])  # per head
    scale_mod.double()
    attention = get_pe("nope").attention(SHAPE, PEConfig()).double()
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    positions = torch.arange(37)
    got = attention(scale_mod(q, positions), k, v)
    s = scale_mod.s.detach().clone().requires_grad_(kind == "learned")
    want = scaled_softmax_attention(q, k, v, s, SHAPE.softmax_scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    d_out = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [q, k, v], d_out, retain_graph=True)
    want_grads = torch.autograd.grad(want, [q, k, v], d_out, retain_graph=True)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if kind == "learned":
        (ds_got,) = torch.autograd.grad(got, [scale_mod.s], d_out)
        (ds_want,) = torch.autograd.grad(want, [s], d_out)
        torch.testing.assert_close(ds_got, ds_want, rtol=1e-10, atol=1e-12)
    else:
        assert not list(scale_mod.parameters())


def test_the_default_s_leaves_the_last_training_row_as_it_was():
    """s = 1/ln(L): the factor is 1 at row L − 1, below it earlier, above it beyond L."""
    module = LengthScale(SHAPE, LengthScaleOptions(type="learned"), train_length=128)
    assert module.s.detach() == pytest.approx([1 / math.log(128)] * 4)
    q = torch.ones(1, 4, 256, 8)
    factor = module(q, torch.arange(256))[0, 0, :, 0].detach()
    assert factor[127] == pytest.approx(1.0)
    assert factor[0] == 0 and factor[63] < 1 < factor[255]


def test_positions_are_the_rows_global_positions():
    """A rank holding rows 96..127 of a sequence (context parallelism) scales them as the
    whole sequence's rows 96..127."""
    module = LengthScale(SHAPE, LengthScaleOptions(type="fixed"), train_length=128)
    q = torch.randn(1, 4, 128, 8)
    whole = module(q, torch.arange(128))
    torch.testing.assert_close(module(q[:, :, 96:], torch.arange(96, 128)), whole[:, :, 96:])


def test_a_non_positive_s_names_the_key():
    with pytest.raises(ConfigError, match="^pe.length_scale.s: must be > 0"):
        check(load_config(["pe.length_scale.type=fixed", "pe.length_scale.s=0"]), 1,
              data=False)


@pytest.mark.parametrize("overrides, name", [
    (["model.pe=cope", "pe.length_scale.type=learned"], "cope+ssmax"),
    (["pe.length_scale.type=fixed", "pe.rope_scaling.type=yarn", "pe.rope_scaling.factor=8"],
     "rope+logn+yarn×8"),
    (["model.pe=cope"], "cope"),
])
def test_a_length_scaled_model_is_its_own_row_in_evaluations_and_reports(overrides, name):
    from cope_megatron.pe import label

    assert label(load_config(overrides)) == name


def test_a_report_labels_a_run_without_an_evaluation_by_its_length_scale(tmp_path):
    from cope_megatron.config import dump_yaml
    from cope_megatron.report.runs import load_run

    dump_yaml(load_config(["pe.length_scale.type=learned"]), tmp_path / "config.yaml")
    assert load_run(tmp_path).label == "rope+ssmax"
