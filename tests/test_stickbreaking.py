"""Stick-breaking attention: the reference against the paper's stick broken one key at a
time, the chunked op (the CPU's C++ kernel, eager torch, and torch.compile as CUDA runs it)
against the float64 reference in forward and every gradient at odd lengths and with GQA,
float32 and bf16 against float64, and the context-parallel op against one rank on 2 and 4
forked ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from cope_megatron.ops import stickbreaking_tiles as tiles
from cope_megatron.ops.context_parallel.ring import ContextParallel
from cope_megatron.ops.context_parallel.stickbreaking import (
    stickbreaking_attention_context_parallel,
)
from cope_megatron.ops.stickbreaking import stickbreaking_attention
from tests.helpers import forked_ranks, local_rows


def inputs(b, h, g, s, d, *, shift=0.0, dtype=torch.float64, seed=0):
    """q, k, v and an output gradient; ``shift`` > 0 moves every logit by about −shift²
    (β near 0: long sticks reaching far back), < 0 by about +shift² (q and k along one
    direction; β near 1: each stick is spent within a few keys)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(b, h, s, d), randn(b, g, s, d), randn(b, g, s, d)
    direction = torch.zeros(d, dtype=torch.float64)
    direction[0] = shift
    k = k - direction if shift >= 0 else k + direction
    return (q + direction).to(dtype), k.to(dtype), v.to(dtype), randn(b, h, s, d).to(dtype)


def paper_loops(q, k, v, scale):
    """Each query breaks its stick from the nearest earlier key back; the rest of the
    stick weights its own value."""
    b, h, s, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(s):
                stick, o = 1.0, torch.zeros(d, dtype=q.dtype)
                for j in range(i - 1, -1, -1):
                    beta = torch.sigmoid(scale * q[bi, hi, i] @ k[bi, hi // rep, j])
                    o = o + stick * beta * v[bi, hi // rep, j]
                    stick = stick * (1 - beta)
                out[bi, hi, i] = o + stick * v[bi, hi // rep, i]
    return out


def test_reference_is_the_paper_formula():
    q, k, v, _ = inputs(1, 2, 1, 9, 4)
    got = stickbreaking_attention(q, k, v, softmax_scale=0.7, impl="reference")
    torch.testing.assert_close(got, paper_loops(q, k, v, 0.7), rtol=0, atol=1e-12)


def grads(impl, q, k, v, d_out, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = stickbreaking_attention(*leaves, impl=impl, **kw)
    return (out, *torch.autograd.grad(out, leaves, d_out))


CASES = {  # (b, h, g, s, d, tile keys, tile rows, logit shift)
    "odd_gqa_tiles": (2, 4, 2, 37, 8, 8, 16, 0.0),
    "long_sticks": (1, 2, 1, 50, 4, 16, 8, 2.0),
    "one_tile": (1, 3, 3, 5, 4, 128, 256, 0.0),
    # β ≈ 1: each row's survival underflows float64 within a few keys, the rest is skipped
    "sticks_break_at_once": (1, 2, 2, 60, 4, 4, 8, -12.0),
}


def _compare(case, blocks, monkeypatch):
    b, h, g, s, d, tile, rows, shift = CASES[case]
    q, k, v, d_out = inputs(b, h, g, s, d, shift=shift)
    want = grads("reference", q, k, v, d_out)
    monkeypatch.setattr(tiles, "TILE", tile)
    monkeypatch.setattr(tiles, "TILE_ROWS", rows)
    got = grads("chunked", q, k, v, d_out, blocks=blocks)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    return q, k, v


@pytest.mark.parametrize("blocks", ["native", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_matches_reference(case, blocks, monkeypatch):
    _compare(case, blocks, monkeypatch)


@pytest.mark.parametrize("blocks", ["native", "eager"])
def test_tiles_stop_once_every_weight_underflows(blocks, monkeypatch):
    """The early stop is taken (a row block goes back through fewer keys than it has),
    and exact."""
    reached = []  # (keys of the window, keys gone through)
    real = tiles.key_tiles

    def counting(keys):
        for t0, t1 in real(keys):
            reached.append((keys.stop - keys.start, t1 - keys.start))
            yield t0, t1

    monkeypatch.setattr(tiles, "key_tiles", counting)
    _compare("sticks_break_at_once", blocks, monkeypatch)
    # The last block's rows have 59 keys, in tiles of 4, then 8: it stops after 28 of them
    # (a logit of about 72 a key, float64's limit about 709).
    last = [gone for keys, gone in reached if keys == 59]
    assert last and max(last) < 59 // 2, reached


@pytest.mark.slow
def test_chunked_compiled_matches_reference(monkeypatch):
    """torch.compile's code (what CUDA runs from COMPILE_MIN_SEQ keys), here on the CPU;
    slow: Inductor compiles the forward and backward blocks (a minute or more)."""
    _compare("odd_gqa_tiles", "compiled", monkeypatch)


def test_chunked_bfloat16_follows_float32():
    q, k, v, d_out = inputs(1, 4, 2, 70, 16, dtype=torch.float32)
    want = grads("chunked", q, k, v, d_out)
    got = grads("chunked", *(t.bfloat16() for t in (q, k, v, d_out)))
    assert got[0].dtype == torch.bfloat16
    for x, y in zip(got, want):
        torch.testing.assert_close(x.float(), y, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("blocks", ["native", "eager"])
@pytest.mark.parametrize("shift", [0.0, 2.0], ids=["short_sticks", "long_sticks"])
def test_float32_follows_float64(shift, blocks):
    """float32 over 300 keys, several tiles, the C++ kernel's arithmetic (a vectorized exp,
    the stick as a product) as torch's: within float32 rounding of the float64 reference,
    relative to each tensor's largest entry (dq's sums cancel: 3e-5 seen in both)."""
    q, k, v, d_out = inputs(1, 4, 2, 300, 16, shift=shift)
    want = grads("reference", q, k, v, d_out)
    got = grads("chunked", *(t.float() for t in (q, k, v, d_out)), blocks=blocks)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        error = ((x.double() - y).abs().max() / y.abs().max()).item()
        assert error < 1e-4, (name, error)


@pytest.mark.parametrize("blocks", ["native", "eager"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_huge_logits_break_the_stick_or_leave_it(dtype, blocks):
    """Every fifth key's logits about ±1000: β = 1 breaks the stick there, β = 0 must leave
    it whole for the farther keys (past exp's range in both dtypes)."""
    q, k, v, d_out = inputs(1, 2, 1, 40, 4)
    k[:, :, ::5] *= 1000
    want = grads("reference", q, k, v, d_out)
    got = grads("chunked", *(t.to(dtype) for t in (q, k, v, d_out)), blocks=blocks)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        error = ((x.double() - y).abs().max() / y.abs().max()).item()
        assert error < (1e-10 if dtype == torch.float64 else 2e-3), (name, error)  # fp32: 4e-4


@pytest.mark.parametrize("blocks", ["native", "eager"])
def test_nan_input_gives_nan_rows(blocks):
    """A diverged run's NaN must reach the output, for the non-finite guard to see."""
    q, k, v, _ = inputs(1, 2, 2, 40, 8, dtype=torch.float32)
    q[0, 0, 20, 0] = float("nan")
    out = stickbreaking_attention(q, k, v, blocks=blocks)
    assert out[0, 0, 20].isnan().all() and not out[0, 0, :20].isnan().any()


def test_block_code_per_device(monkeypatch, request, tmp_path):
    """CPU: the C++ kernel, and eager torch where it does not build (with the build's
    warning); CUDA: torch.compile from COMPILE_MIN_SEQ keys. A given choice is kept."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tiles.block_code(cpu, 64, None) == "native"
    assert tiles.block_code(cpu, 64, "compiled") == "compiled"
    monkeypatch.setattr(tiles, "can_compile", lambda device_type: True)
    assert tiles.block_code(cuda, tiles.COMPILE_MIN_SEQ - 1, None) == "eager"
    assert tiles.block_code(cuda, tiles.COMPILE_MIN_SEQ, None) == "compiled"
    with pytest.raises(RuntimeError, match="runs on CPU"):
        tiles.block_code(cuda, 64, "native")

    request.addfinalizer(tiles.stickbreaking_native.library.cache_clear)
    monkeypatch.setenv("COPE_MEGATRON_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that exits 1
    tiles.stickbreaking_native.library.cache_clear()
    with pytest.warns(UserWarning, match="stickbreaking_tile.cpp did not build"):
        assert tiles.block_code(cpu, 64, None) == "eager"


def test_errors_name_the_problem():
    q, k, v, _ = inputs(1, 2, 1, 6, 4)
    with pytest.raises(ValueError, match="g dividing h"):
        stickbreaking_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="unknown stick-breaking impl"):
        stickbreaking_attention(q, k, v, impl="triton")


# -- context parallelism -------------------------------------------------------------------


def _counting_forward(logits: list[int]):
    """``tiles.block_functions`` whose forward block counts the logits it computes."""
    real = tiles.block_functions

    def functions(blocks):
        forward, backward = real(blocks)

        def counted(q_blk, k_rev, *args):
            logits.append(q_blk.shape[0] * q_blk.shape[1] * q_blk.shape[2] * k_rev.shape[2])
            return forward(q_blk, k_rev, *args)

        return counted, backward

    return functions


def _cp_worker(cases: list[dict]) -> None:
    dist.init_process_group("gloo")
    cp = ContextParallel(dist.group.WORLD)
    for case in cases:
        q, k, v, d_out = inputs(*case["shape"], shift=case["shift"],
                                dtype=case.get("dtype", torch.float64))
        # bf16 (fp32 inside) against the single-rank op on the same rounded inputs
        want = grads("reference" if q.dtype == torch.float64 else "chunked", q, k, v, d_out)
        tol = case.get("tol", 1e-10)
        logits: list[int] = []
        tiles.TILE = tiles.TILE_ROWS = case.get("tile", 256)
        tiles.block_functions = _counting_forward(logits)
        leaves = [local_rows(cp, t).requires_grad_() for t in (q, k, v)]
        out = stickbreaking_attention_context_parallel(
            *leaves, cp, softmax_scale=1 / math.sqrt(q.shape[-1]), blocks=case["blocks"])
        got = (out, *torch.autograd.grad(out, leaves, local_rows(cp, d_out)))
        for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
            torch.testing.assert_close(x, local_rows(cp, y), rtol=tol, atol=tol,
                                       msg=lambda m, n=name, c=case: f"{c} {n}: {m}")
        if "most_skipped" in case:  # sticks spent early: most pairs' rows and keys skipped
            b, h, c = q.shape[0], q.shape[1], q.shape[2] // (2 * cp.size)
            every = b * h * c * c * len(cp.pairs(cp.rank)) * cp.size
            # forward blocks run in the forward and, over off-diagonal pairs' visited tiles,
            # in the backward's loss sums
            assert sum(logits) < case["most_skipped"] * 2 * every, (sum(logits), every)
    dist.destroy_process_group()


CP_CASES = [dict(shape=(2, 4, 2, 48, 8), shift=0.0, blocks=None),
            dict(shape=(1, 2, 1, 40, 4), shift=2.0, blocks="eager"),
            # β ≈ 1, blocks of 16 rows, tiles from 16 keys: a row block stops a few keys
            # past its first row, and a pair whose rows nearer chunks have all spent is
            # skipped: a quarter of the logits or less (all: 1/2 on the diagonal, 1 off it)
            dict(shape=(1, 2, 1, 256, 4), shift=-12.0, blocks=None, tile=16, most_skipped=0.25),
            dict(shape=(1, 2, 1, 96, 4), shift=-12.0, blocks="eager", tile=4),
            dict(shape=(2, 4, 2, 48, 8), shift=1.0, blocks=None, tile=8, dtype=torch.bfloat16,
                 tol=1e-2)]  # a bf16 ulp or two


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_rank(world):
    forked_ranks(world, _cp_worker, CP_CASES)


@pytest.mark.integration
@pytest.mark.slow
def test_context_parallel_compiled_matches_one_rank():
    """CUDA's block code (torch.compile) in the pairs; slow: each rank compiles."""
    forked_ranks(2, _cp_worker, [dict(CP_CASES[0], blocks="compiled")])
