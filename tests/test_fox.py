"""FoX forgetting attention: the reference against the paper's sum written as loops, the
chunked op (CPU flash and CUDA's matrix-product path) against the float64 reference in
forward and every gradient (the forget gates' included) at odd lengths and with GQA, bf16
against fp32, and the context-parallel op against one rank on 2 and 4 forked ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cope_megatron.distributed.cpu_compat import apply_cpu_compat
from cope_megatron.ops import fox as fox_ops
from cope_megatron.ops.context_parallel.fox import (
    forget_prefix,
    fox_attention_context_parallel,
)
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.fox import fox_attention
from tests.helpers import forked_ranks, local_rows


def inputs(b, h, g, s, d, *, gate_bias=2.0, dtype=torch.float64, seed=0):
    """q, k, v, forget-gate logits and an output gradient; gates σ(logit) near σ(gate_bias)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (randn(b, h, s, d), randn(b, g, s, d), randn(b, g, s, d),
            randn(b, h, s) + gate_bias, randn(b, h, s, d))


def paper_loops(q, k, v, log_f, scale):
    """One query, one key at a time: logits q·k·scale + Σ_{l=j+1..i} log f_l."""
    b, h, s, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                logits = torch.stack([scale * q[bi, hi, i] @ k[bi, hi // rep, j]
                                      + log_f[bi, hi, j + 1:i + 1].sum() for j in range(i + 1)])
                out[bi, hi, i] = torch.softmax(logits, 0) @ v[bi, hi // rep, :i + 1]
    return out


def test_reference_is_the_paper_formula():
    q, k, v, logit, _ = inputs(1, 2, 1, 9, 4, gate_bias=0.0)
    log_f = F.logsigmoid(logit)
    got = fox_attention(q, k, v, log_f, softmax_scale=0.7, impl="reference")
    torch.testing.assert_close(got, paper_loops(q, k, v, log_f, 0.7), rtol=0, atol=1e-12)


def grads(impl, q, k, v, logit, d_out, **kw):
    """Output and gradients of q, k, v and the gate logits (through log σ)."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, logit)]
    out = fox_attention(*leaves[:3], F.logsigmoid(leaves[3]), impl=impl, **kw)
    return (out, *torch.autograd.grad(out, leaves, d_out))


CASES = {  # (b, h, g, s, d, rows, gate bias)
    "odd_gqa_blocks": (2, 4, 2, 37, 8, 8, 2.0),
    "strong_forgetting": (1, 2, 1, 50, 4, 16, -3.0),
    "one_block": (1, 3, 3, 5, 4, 1024, 0.0),
    # log f ≈ −60: far keys' weights underflow float64, and the op leaves them out
    "forgets_far_keys": (1, 2, 1, 64, 4, 16, -60.0),
}


@pytest.mark.parametrize("flash", [True, False], ids=["cpu_flash", "cuda_matmul"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_reference(case, flash):
    b, h, g, s, d, rows, bias = CASES[case]
    q, k, v, logit, d_out = inputs(b, h, g, s, d, gate_bias=bias)
    want = grads("reference", q, k, v, logit, d_out)
    got = grads("chunked", q, k, v, logit, d_out, flash=flash, rows=rows)
    for name, x, y in zip(["out", "dq", "dk", "dv", "dlogit"], got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_keys_that_underflow_are_left_out_and_no_others():
    """``far_keys``: with log f ≈ −60 the rows 32…47 leave out the keys whose bound is below
    float64's smallest subnormal, a prefix; with no forgetting, none."""
    q, k, v, logit, _ = inputs(1, 2, 1, 64, 4, gate_bias=-60.0)
    prefix = F.logsigmoid(logit).cumsum(-1)
    own = fox_ops.key_norms(k[:, :, 32:48], prefix.dtype).amax(-1)
    first = fox_ops.far_keys(q[:, :, 32:48], k[:, :, :32], prefix[:, :, 32], prefix[:, :, :32],
                             own, scale=0.5)
    assert 10 < first < 32
    # Every left-out key's weight is 0 in the reference.
    weights = torch.softmax(0.5 * q @ k.transpose(-1, -2) + prefix[..., :, None]
                            - prefix[..., None, :] + torch.full((64, 64), -math.inf).triu(1),
                            dim=-1)
    assert (weights[:, :, 32:48, :first] == 0).all()
    assert fox_ops.far_keys(q[:, :, 32:48], k[:, :, :32], torch.zeros(1, 2),
                            torch.zeros(1, 2, 32, dtype=torch.float64), own, scale=0.5) == 0


def test_chunked_bfloat16_follows_float32():
    q, k, v, logit, d_out = inputs(1, 4, 2, 70, 16, dtype=torch.float32)
    want = grads("chunked", q, k, v, logit, d_out, rows=32)
    got = grads("chunked", *(t.bfloat16() for t in (q, k, v)), logit, d_out.bfloat16(),
                rows=32)
    assert got[0].dtype == torch.bfloat16
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y, rtol=0.05, atol=0.05)


def test_errors_name_the_problem():
    q, k, v, logit, _ = inputs(1, 2, 1, 6, 4)
    with pytest.raises(ValueError, match="log_f must be"):
        fox_attention(q, k, v, logit[:, :1])
    with pytest.raises(ValueError, match="unknown FoX impl"):
        fox_attention(q, k, v, logit, impl="triton")


# -- context parallelism -------------------------------------------------------------------


def _cp_worker(cases: list[dict]) -> None:
    dist.init_process_group("gloo")
    cp = ContextParallel(dist.group.WORLD)
    for case in cases:
        q, k, v, logit, d_out = inputs(*case["shape"], gate_bias=case["bias"])
        want = grads("reference", q, k, v, logit, d_out)
        leaves = [local_rows(cp, t.unsqueeze(-1)).squeeze(-1) if t.dim() == 3
                  else local_rows(cp, t) for t in (q, k, v, logit)]
        leaves = [t.requires_grad_() for t in leaves]
        out = fox_attention_context_parallel(
            *leaves[:3], F.logsigmoid(leaves[3]), cp, softmax_scale=1 / math.sqrt(q.shape[-1]),
            flash=case["flash"])
        got = (out, *torch.autograd.grad(out, leaves, local_rows(cp, d_out)))
        for name, x, y in zip(["out", "dq", "dk", "dv", "dlogit"], got, want):
            y = local_rows(cp, y.unsqueeze(-1)).squeeze(-1) if y.dim() == 3 else local_rows(cp, y)
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10,
                                       msg=lambda m, n=name, c=case: f"{c} {n}: {m}")
        # The global prefix: each rank's chunks continue the ones before them.
        prefix = forget_prefix(F.logsigmoid(leaves[3].detach()), cp)
        full = F.logsigmoid(logit.unsqueeze(-1)).squeeze(-1).cumsum(-1)
        torch.testing.assert_close(prefix, local_rows(cp, full.unsqueeze(-1)).squeeze(-1))
    dist.destroy_process_group()


CP_CASES = [dict(shape=(2, 4, 2, 48, 8), bias=2.0, flash=True),
            dict(shape=(1, 2, 1, 40, 4), bias=-3.0, flash=False),
            # far chunks' weights underflow float64: pairs leave their keys out
            dict(shape=(1, 2, 1, 40, 4), bias=-40.0, flash=True)]


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_rank(world):
    forked_ranks(world, _cp_worker, CP_CASES)


# -- in the model --------------------------------------------------------------------------


def _gradients(recompute: str) -> dict[str, torch.Tensor]:
    from cope_megatron.config import load_config
    from cope_megatron.distributed.parallel import init_distributed, seed_everything
    from cope_megatron.model.gpt import build_gpt, lm_loss
    from cope_megatron.pe import get_pe

    cfg = load_config(["model.pe=fox", "model.num_layers=2", "model.hidden_size=32",
                       "model.num_attention_heads=4", "model.seq_length=16",
                       f"train.recompute={recompute}"])
    init_distributed(1)
    seed_everything(0)
    model = build_gpt(cfg, get_pe("fox"), 100)
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    lm_loss(model, tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_forget_gate_is_a_projection_of_the_layer_input_under_every_recomputation(
        dist_cleanup):
    """The gate has one row per head and gets gradients; selective recomputation (the core
    attention checkpointed, the gate logits among its inputs) and full give the same
    gradients as none."""
    want = _gradients("none")
    gate = [n for n in want if "linear_gate" in n]
    assert sorted(gate) == [f"decoder.layers.{i}.self_attention.linear_gate.{p}"
                            for i in range(2) for p in ("bias", "weight")]
    weight = want["decoder.layers.0.self_attention.linear_gate.weight"]
    assert weight.shape == (4, 32) and weight.abs().sum() > 0
    for mode in ("selective", "full"):
        got = _gradients(mode)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7,
                                       msg=lambda m, n=name, r=mode: f"{r} {n}: {m}")


def test_cpu_processes_flush_subnormals():
    """Every CPU run flushes subnormals, which FoX's far keys pass through (6x slower at 4k
    tokens when the CPU computes them: bench/results_peers_op_cpu.txt)."""
    apply_cpu_compat()
    tiny = torch.tensor([1e-39])  # below fp32's smallest normal, 1.18e-38
    assert (tiny * 1.0).item() == 0.0
