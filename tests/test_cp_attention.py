"""Context-parallel attention alone against the single-rank ops, in float64, forward and
every gradient: CoPE (carried gate sums, clamping across chunk borders, gates near 0 so
the carries span many chunks, GQA, shared and per-head tables; the chunked pair code on
CUDA's paths too) and the softmax ring with and without a distance bias; CoPE in bf16
against the single-rank op on the same bf16 inputs, and the ring in bf16 against itself in
fp32 on the same values. Ranks are processes on gloo."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from cope_megatron.ops.context_parallel import softmax as softmax_ring
from cope_megatron.ops.context_parallel.cope import cope_attention_context_parallel
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.context_parallel.softmax import ring_attention
from cope_megatron.ops.cope import chunked as cope_chunked
from cope_megatron.ops.cope.reference import cope_attention_reference
from cope_megatron.ops.heads import expand_kv
from cope_megatron.ops.position_bias import distance_bias
from tests.helpers import COPE_PATHS, forked_ranks, local_rows


def spawn(tmp_path, world: int, fn, *args) -> None:
    """``fn(rank, world, store, *args)`` on ``world`` ranks."""
    forked_ranks(world, _as_rank, fn, str(tmp_path / "store"), *args)


def _as_rank(fn, store: str, *args) -> None:
    fn(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), store, *args)


def _init(rank: int, world: int, store: str) -> ContextParallel:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    return ContextParallel(dist.group.WORLD)


def _inputs(case: dict):
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    b, h, g, s, d = case["b"], case["h"], case["g"], case["s"], case["d"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(b, h, s, d), randn(b, g, s, d), randn(b, g, s, d)
    # A shared direction with opposite signs in q and k pushes every logit down: gates
    # near 0, so positions grow slowly and the carries reach back over many chunks.
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = case.get("gate_shift", 0.0)
    q, k = q + shift, k - shift
    table = randn(1 if case["shared"] else h, d, case["npos"])
    return q, k, v, table, randn(b, h, s, d)


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(got, want, rtol=10 * tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _cope_worker(rank: int, world: int, store: str, case: dict) -> None:
    cp = _init(rank, world, store)
    passes = []  # the visits that went round a ring, by name

    def counting(ring):
        def counted(tensors, visit, *args, **kwargs):
            passes.append(visit.__name__)
            return ring(tensors, visit, *args, **kwargs)
        return counted

    cp.ring, cp.ring_backward = counting(cp.ring), counting(cp.ring_backward)
    q, k, v, table, d_out = _inputs(case)
    scale = 1 / math.sqrt(case["d"])
    full = [t.clone().requires_grad_() for t in (q, k, v, table)]
    ref = cope_attention_reference(*full, npos_max=case["npos_max"], softmax_scale=scale)
    want = torch.autograd.grad(ref, full, d_out)
    local = [local_rows(cp, t).requires_grad_() for t in (q, k, v)]
    table_l = table.clone().requires_grad_()
    out = cope_attention_context_parallel(*local, table_l, cp, npos_max=case["npos_max"],
                                          softmax_scale=scale, impl=case.get("impl", "chunked"),
                                          paths=case.get("paths"))
    got = torch.autograd.grad(out, (*local, table_l), local_rows(cp, d_out))
    tol = case.get("tol", 1e-10)
    _check("out", out, local_rows(cp, ref), tol)
    for name, g, w in zip("qkv", got, want):
        _check(f"d{name}", g, local_rows(cp, w), tol)
    d_table = got[3].clone()
    dist.all_reduce(d_table)  # each rank holds its rows' part of the table's gradient
    _check("dtable", d_table, want[3], tol)
    if "remote_corrections" in case:  # the correction ring runs only when a rank needs it
        assert ("remote_pass" in passes) == case["remote_corrections"], passes
    dist.destroy_process_group()


COPE_CASES = {
    # clamping at npos_max − 1 = 2 within a couple of keys: crosses every chunk border
    "clamp_across_borders": dict(b=2, h=4, g=2, s=24, d=8, npos=6, npos_max=3, shared=False),
    # gates ≈ 0.05: positions stay below npos_max, carries span every earlier chunk, and
    # the correction ring runs
    "gates_near_zero": dict(b=1, h=2, g=1, s=32, d=8, npos=8, npos_max=8, shared=True,
                            gate_shift=2.0, remote_corrections=True),
    # gates ≈ ½ clamp within a few keys, well inside a chunk: a row's carried Σ dp is only
    # against its own chunk's keys, so no correction ring
    "clamp_within_chunks": dict(b=1, h=2, g=2, s=128, d=8, npos=6, npos_max=3, shared=True,
                                seed=5, remote_corrections=False),
    "moderate": dict(b=1, h=4, g=4, s=40, d=4, npos=10, npos_max=6, shared=True, seed=3),
}


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", COPE_CASES, ids=list(COPE_CASES))
def test_cope_context_parallel_matches_one_rank(tmp_path, world, case):
    spawn(tmp_path, world, _cope_worker, COPE_CASES[case])


# CUDA's choices for the pair code: below COMPILE_MIN_SEQ keys (eager band, matmul far keys,
# head batches not by threads) and above (torch.compile, slow: each rank compiles).
CUDA_BELOW_COMPILE = COPE_PATHS["eager_matmul"]


@pytest.mark.integration
@pytest.mark.parametrize("paths", [
    pytest.param(CUDA_BELOW_COMPILE, id="cuda_eager"),
    pytest.param(COPE_PATHS["cuda"], id="cuda_compiled", marks=pytest.mark.slow)])
def test_cope_context_parallel_on_cuda_paths(tmp_path, paths):
    spawn(tmp_path, 2, _cope_worker, dict(COPE_CASES["clamp_across_borders"], paths=paths))


def _cope_bf16_worker(rank: int, world: int, store: str, case: dict) -> None:
    """The single-rank chunked op and the CP op on the same bf16 inputs; records the dtypes
    that reach the pair code (``chunk_forward``/``chunk_backward``)."""
    cp = _init(rank, world, store)
    bf16 = torch.bfloat16
    q, k, v, table, d_out = (t.to(bf16) for t in _inputs(case))
    scale, paths = 1 / math.sqrt(case["d"]), case.get("paths")
    full = [t.clone().requires_grad_() for t in (q, k, v, table)]
    ref = cope_chunked.cope_attention_chunked(*full, npos_max=case["npos_max"],
                                              softmax_scale=scale, paths=paths)
    want = torch.autograd.grad(ref, full, d_out)

    seen = []

    def spy(real):
        def call(q, k, v, z, carry, *args, **kw):
            seen.append((q.dtype, k.dtype, v.dtype, z.dtype, carry.dtype))
            return real(q, k, v, z, carry, *args, **kw)
        return call

    # This forked rank only.
    cope_chunked.chunk_forward = spy(cope_chunked.chunk_forward)
    cope_chunked.chunk_backward = spy(cope_chunked.chunk_backward)

    local = [local_rows(cp, t).requires_grad_() for t in (q, k, v)]
    table_l = table.clone().requires_grad_()
    out = cope_attention_context_parallel(*local, table_l, cp, npos_max=case["npos_max"],
                                          softmax_scale=scale, paths=paths)
    got = torch.autograd.grad(out, (*local, table_l), local_rows(cp, d_out))
    # bf16 into the pair code, the accumulators (z, carries; out, lse, grads) in fp32.
    assert seen and set(seen) == {(bf16, bf16, bf16, torch.float32, torch.float32)}, seen
    assert out.dtype == bf16 and all(g.dtype == bf16 for g in got)
    # Both compute in fp32 from the same bf16 values and differ only in summation order
    # (~1e-6 relative), so their bf16 roundings agree or differ by one step: 2⁻⁷ relative
    # at most (8 significant bits), the atol the same step at the gradients' scale of 1.
    tol = 2.0 ** -7
    torch.testing.assert_close(out, local_rows(cp, ref), rtol=tol, atol=tol)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, local_rows(cp, w), rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"d{name}: {m}")
    # The table's gradient is summed over ranks from parts rounded to bf16 each: one
    # step per rank, and the single-rank total's own.
    d_table = got[3].float()
    dist.all_reduce(d_table)
    torch.testing.assert_close(d_table, want[3].float(), rtol=(world + 1) * tol,
                               atol=(world + 1) * tol * want[3].float().abs().max().item())
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("paths", [
    pytest.param(None, id="auto"),
    pytest.param(CUDA_BELOW_COMPILE, id="cuda_eager", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", ["clamp_across_borders", "gates_near_zero"])
def test_cope_context_parallel_bf16_matches_one_rank_op(tmp_path, case, paths):
    """bf16 q, k, v stay bf16 through the exchange into the pair code, which accumulates
    in fp32; the result is the single-rank op's on the same bf16 inputs."""
    spawn(tmp_path, 2, _cope_bf16_worker, dict(COPE_CASES[case], paths=paths))


@pytest.mark.integration
@pytest.mark.triton
def test_cope_context_parallel_triton_kernels(tmp_path):
    """The same exchange with the Triton pair kernels (interpreter on CPU; fp32 inside)."""
    pytest.importorskip("triton")
    case = dict(COPE_CASES["clamp_across_borders"], impl="triton", tol=2e-5)
    spawn(tmp_path, 2, _triton_worker, case)


def _triton_worker(rank: int, world: int, store: str, case: dict) -> None:
    from cope_megatron.ops.cope import triton_kernels as cope_triton

    cope_triton.BLOCK_M = cope_triton.BLOCK_N = 4  # several blocks per chunk
    _cope_worker(rank, world, store, case)


def _softmax_worker(rank: int, world: int, store: str, case: dict) -> None:
    cp = _init(rank, world, store)
    softmax_ring.BLOCK_ELEMENTS = case["b"] * case["h"] * 2  # biased pairs: 2-row blocks
    softmax_ring.PLAIN_BLOCK = 4  # unbiased pairs' backward: 4 × 4 blocks, some partial
    q, k, v, _, d_out = _inputs(case)
    s, h = case["s"], case["h"]
    gen = torch.Generator().manual_seed(9)
    bias = torch.randn(h, s, generator=gen, dtype=torch.float64) if case["bias"] else None
    scale = 0.3
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    bias_f = None if bias is None else bias.clone().requires_grad_()
    logits = scale * full[0] @ expand_kv(full[1], h).transpose(-1, -2)
    pos = torch.arange(s)
    if bias_f is not None:
        logits = logits + bias_f[:, (pos[:, None] - pos[None, :]).clamp(min=0)]
    logits = logits.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    ref = torch.softmax(logits, -1) @ expand_kv(full[2], h)
    want = torch.autograd.grad(ref, full + ([bias_f] if bias_f is not None else []), d_out)

    local = [local_rows(cp, t).requires_grad_() for t in (q, k, v)]
    bias_l = None if bias is None else bias.clone().requires_grad_()
    out = ring_attention(*local, cp, softmax_scale=scale,
                         bias=None if bias_l is None else distance_bias(bias_l),
                         flash=case["flash"])
    got = torch.autograd.grad(out, local + ([bias_l] if bias_l is not None else []),
                              local_rows(cp, d_out))
    _check("out", out, local_rows(cp, ref))
    for name, g, w in zip("qkv", got, want):
        _check(f"d{name}", g, local_rows(cp, w))
    if bias is not None:
        d_bias = got[3].clone()
        dist.all_reduce(d_bias)
        _check("dbias", d_bias, want[3])
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("bias, flash", [(False, True), (False, False), (True, None)],
                         ids=["plain_flash", "plain_matmul", "distance_bias"])
def test_ring_attention_matches_one_rank(tmp_path, world, bias, flash):
    spawn(tmp_path, world, _softmax_worker,
          dict(b=2, h=4, g=2, s=24, d=8, npos=2, shared=True, bias=bias, flash=flash))


def _softmax_bf16_worker(rank: int, world: int, store: str, case: dict) -> None:
    """The ring on bf16 inputs and on the same values in fp32: the same fp32 math, so the
    same results once rounded; and bf16 q is kept for backward as it came: the output is
    the only fp32 tensor of q's shape saved (no fp32 copy of the rank's rows)."""
    cp = _init(rank, world, store)
    q, k, v, _, d_out = (local_rows(cp, t.to(torch.bfloat16)) for t in _inputs(case))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ring_attention(*leaves, cp, softmax_scale=0.3, flash=case["flash"])
    got = (out, *torch.autograd.grad(out, leaves, d_out))
    exact = [t.float().requires_grad_() for t in (q, k, v)]
    ref = ring_attention(*exact, cp, softmax_scale=0.3, flash=case["flash"])
    want = (ref, *torch.autograd.grad(ref, exact, d_out.float()))
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        assert g.dtype == torch.bfloat16, name
        torch.testing.assert_close(g, w.to(torch.bfloat16), rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert saved.count((torch.float32, tuple(q.shape))) == 1, saved
    dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("flash", [True, False], ids=["flash", "matmul"])
def test_ring_attention_bf16_keeps_q_as_it_came(tmp_path, flash):
    spawn(tmp_path, 2, _softmax_bf16_worker,
          dict(b=2, h=4, g=2, s=24, d=8, npos=2, shared=True, flash=flash))
