"""On a CUDA device (``pytest -m gpu``; skipped without one, never in the CPU default):
the compiled Triton CoPE kernels against the float64 reference, forward and all four
gradients, in fp32 and bf16; the FoX and stick-breaking ops' CUDA paths likewise; the
bias PEs (ALiBi, T5, Kerple, FIRE) on FlexAttention against the materialized bias, with
their parameters' gradients; a few bf16 DeepSpeed steps of the
debug model for every PE;
the activation estimate for 125M against the allocator; TP=2 against one process when two
GPUs exist.

Tolerances are relative errors ‖x − ref‖ / ‖ref‖: fp32 kernels use exact fp32 products
(``input_precision="ieee"``), so they land near 1e-6 and are held to 1e-4, but for the
gradients that pass through positions (dq, dk, dE) on long rows, held to 1e-3: where a
key's position lies within fp32's resolution of an integer, ∂b/∂p jumps (zd[n − 1] to
zd[n]) and fp32 takes either side; the 1500-token multi-query case has three such rows
and lands at 4.5e-4 in the interpreter (tests/test_cope_triton.py). bf16 inputs and
outputs carry bf16 rounding (2⁻⁸ ≈ 4e-3 per element), held to 2e-2.
"""

import math
import os
import sys

import pytest
import torch

from cope_megatron.config import Layout, PEConfig, load_config
from cope_megatron.ops import cope_attention
from cope_megatron.ops.cope.reference import cope_attention_reference
from cope_megatron.pe import REGISTRY, get_pe
from cope_megatron.pe.base import AttentionShape
from tests.helpers import debug_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def cuda_context_intact():
    """A CUDA error such as an illegal memory access in a kernel is sticky: every later
    test in the process would fail with it, misleadingly. So after each test the device's
    work is awaited, and on an error the process ends; xdist reports the test as the one
    its worker crashed in and starts a fresh worker for the rest; without xdist the
    session ends there, with its summary."""
    yield
    try:
        torch.cuda.synchronize()
    except RuntimeError as e:  # torch's AcceleratorError is a RuntimeError
        if "PYTEST_XDIST_WORKER" not in os.environ:
            pytest.exit(f"CUDA error, the device context is lost: {e}", returncode=3)
        print(f"CUDA error, ending this test process: {e}", file=sys.stderr, flush=True)
        os._exit(3)

KERNEL_CASES = {
    # b, h, kv heads, seq, head_dim, npos, npos_max, shared table, causal
    "gqa_per_head_odd_seq": (2, 8, 2, 333, 64, 64, 64, False, True),
    "shared_table_clamped": (1, 4, 4, 700, 128, 16, 9, True, True),
    "multi_query_long": (1, 4, 1, 1500, 64, 64, 64, True, True),
    "never_saturates": (1, 2, 2, 200, 32, 256, 256, False, True),
    "non_causal": (2, 2, 1, 129, 16, 32, 32, False, False),
}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_triton_kernels_match_float64_reference(case, dtype):
    b, h, g, s, d, npos, npos_max, shared, causal = case
    gen = torch.Generator(device="cuda").manual_seed(s)

    def randn(*shape, std=1.0):
        return std * torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64)

    inputs = [randn(b, h, s, d), randn(b, g, s, d), randn(b, g, s, d),
              randn(1 if shared else h, d, npos, std=0.5)]
    # The reference sees the very inputs the kernels see (rounded to dtype, then upcast):
    # the error measured is the kernels', not the inputs' rounding.
    fast = [t.to(dtype).requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in fast]
    scale = 1 / math.sqrt(d)
    ref = cope_attention_reference(*exact, npos_max=npos_max, softmax_scale=scale,
                                   causal=causal)
    out = cope_attention(*fast, npos_max=npos_max, softmax_scale=scale, causal=causal,
                         impl="triton")
    grad = randn(*ref.shape)
    want = torch.autograd.grad(ref, exact, grad)
    got = torch.autograd.grad(out, fast, grad.to(dtype))
    errors = {"out": relative_error(out, ref)}
    errors.update({f"d{n}": relative_error(a, w) for n, a, w in zip("qkvE", got, want)})
    tol = {name: TOLERANCE[dtype] for name in errors}
    if dtype == torch.float32 and s > 1000:
        tol.update(dq=1e-3, dk=1e-3, dE=1e-3)
    assert all(e < tol[name] for name, e in errors.items()), errors
    assert all(t.isfinite().all() for t in (out, *got))


def test_chunked_op_on_cuda_matches_float64_reference():
    """``auto``'s choice on CUDA: the chunked op with its torch.compile'd blocks."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64)
              for shape in ((1, 4, 1100, 64), (1, 2, 1100, 64), (1, 2, 1100, 64), (1, 64, 64))]
    fast = [t.float().requires_grad_() for t in inputs]
    exact = [t.detach().clone().requires_grad_() for t in inputs]
    out = cope_attention(*fast)
    ref = cope_attention_reference(*exact, npos_max=64, softmax_scale=1 / 8)
    grad = torch.randn(ref.shape, generator=gen, device="cuda", dtype=torch.float64)
    got = torch.autograd.grad(out, fast, grad.float())
    want = torch.autograd.grad(ref, exact, grad)
    errors = [relative_error(a, w) for a, w in zip((out, *got), (ref, *want))]
    assert max(errors) < TOLERANCE[torch.float32], errors


@pytest.mark.parametrize("pe", ["fox", "stickbreaking"])
def test_peer_chunked_op_on_cuda_matches_float64_reference(pe):
    """``auto``'s choice on CUDA for CoPE's peers: FoX's parts in row-chunked matrix
    products, stick-breaking's torch.compile'd blocks (1100 keys, past COMPILE_MIN_SEQ);
    GQA, forward and every gradient, the forget gates' included."""
    from cope_megatron.ops.fox import fox_attention
    from cope_megatron.ops.stickbreaking import stickbreaking_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64)
              for shape in ((1, 4, 1100, 64), (1, 2, 1100, 64), (1, 2, 1100, 64), (1, 4, 1100))]
    inputs[3] += 3  # forget gates near 0.95
    fast = [t.float().requires_grad_() for t in inputs]
    exact = [t.detach().clone().requires_grad_() for t in inputs]

    def run(q, k, v, gate, impl):
        if pe == "fox":
            return fox_attention(q, k, v, torch.nn.functional.logsigmoid(gate), impl=impl)
        return stickbreaking_attention(q, k, v, impl=impl) + 0 * gate[..., None]

    out, ref = run(*fast, impl="auto"), run(*exact, impl="reference")
    grad = torch.randn(ref.shape, generator=gen, device="cuda", dtype=torch.float64)
    got = torch.autograd.grad(out, fast, grad.float())
    want = torch.autograd.grad(ref, exact, grad)
    errors = [relative_error(a, w) for a, w in zip((out, *got), (ref, *want))
              if w.abs().sum() > 0]
    assert max(errors) < TOLERANCE[torch.float32], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pe", ["alibi", "t5", "kerple", "fire"])
def test_flex_bias_kernels_on_cuda_match_float64_materialized(pe, dtype, dist_cleanup):
    """``pe.bias_kernel=flex`` (compiled FlexAttention) against the materialized bias in
    float64, forward and the gradients of q, k, v and the PE's parameters (T5's table,
    Kerple's r1 and r2, FIRE's MLP): FlexAttention has no backward on CPU, so this is where
    it runs; TP rank 1 of 2 with GQA, 333 tokens (partial blocks). Each case compiles, so
    the suite runs them with the kernels (``-k kernels``), in parallel processes."""
    from cope_megatron.distributed.parallel import init_distributed

    # FIRE's replicated MLP enters a TP shape through Megatron's copy-to-region, whose
    # backward all-reduces over the TP group: a group of one here, as on one GPU.
    init_distributed(1)
    shape = AttentionShape.of_rank(total_heads=8, total_kv_heads=4, head_dim=64, tp_size=2,
                                   tp_rank=1)
    modules = []
    for kernel in ("flex", "materialized"):
        torch.manual_seed(0)  # the same T5 table for both
        modules.append(get_pe(pe).attention(shape, PEConfig(bias_kernel=kernel)).cuda())
    flex, reference = modules[0].to(dtype), modules[1].double()
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(1, h, 333, 64, generator=gen, device="cuda", dtype=torch.float64)
              for h in (shape.num_heads, shape.num_kv_heads, shape.num_kv_heads)]
    fast = [t.to(dtype).requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in fast]
    out, ref = flex(*fast), reference(*exact)
    grad = torch.randn(ref.shape, generator=gen, device="cuda", dtype=torch.float64)
    got = torch.autograd.grad(out, [*fast, *flex.parameters()], grad.to(dtype))
    want = torch.autograd.grad(ref, [*exact, *reference.parameters()], grad)
    errors = [relative_error(a, w) for a, w in zip((out, *got), (ref, *want))]
    assert max(errors) < TOLERANCE[dtype], errors


TRAINING = {pe: {} for pe in sorted(REGISTRY)} | {"cope_triton": {"pe.cope.impl": "triton"}}


@pytest.mark.parametrize("variant", TRAINING)
def test_bf16_deepspeed_training_on_cuda(prepared, tmp_path, dist_cleanup, variant):
    from cope_megatron.train import run_train

    shards, _, _ = prepared
    pe = variant.removesuffix("_triton")
    cfg = load_config(debug_overrides(shards, tmp_path / "run", **{
        "model.pe": pe, "train.precision": "bf16", "train.steps": 12, "zero.stage": 1,
        **TRAINING[variant]}))
    result, _ = run_train(cfg, evaluate_after=False)
    assert all(math.isfinite(loss) for loss in result.losses), result.losses
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.2, result.losses


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_on_two_gpus_matches_one(tmp_path):
    from tests.parallel_worker import launch, layout, pick

    variants = pick("cope", "rope", "alibi")
    one = launch(tmp_path, 1, {"one": layout(1, False, 0, variants)})["one"]
    two = launch(tmp_path, 2, {"tp2": layout(2, False, 0, variants)})["tp2"]
    for name in variants:
        for a, b in zip(one[name]["losses"], two[name]["losses"]):
            assert a == pytest.approx(b, abs=1e-4), name


@pytest.mark.parametrize("pe", ["rope", "alibi", "cope"])
def test_activation_estimate_for_125m_on_cuda(pe, dist_cleanup):
    """``cope-megatron estimate``'s activations against the allocator: the memory a bf16
    forward of the 125M model leaves allocated for its backward, within 20%."""
    from cope_megatron.distributed.parallel import init_distributed
    from cope_megatron.estimate import activation_bytes
    from cope_megatron.model.gpt import build_gpt, loss_sum

    init_distributed(1)
    cfg = load_config(["configs/model/125m.yaml", f"model.pe={pe}", "train.micro_batch_size=2"])
    model = build_gpt(cfg, get_pe(cfg.model.pe), cfg.data.vocab_size).cuda().bfloat16()
    tokens = torch.randint(0, cfg.data.vocab_size, (2, cfg.model.seq_length + 1), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = loss_sum(model, tokens)
    held = torch.cuda.memory_allocated() - base
    estimated = activation_bytes(cfg, get_pe(cfg.model.pe), Layout.of(cfg, 1))["saved"]
    assert estimated == pytest.approx(held, rel=0.2), (pe, estimated / 2**30, held / 2**30)
    loss.backward()
