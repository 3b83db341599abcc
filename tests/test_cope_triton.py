"""The Triton CoPE kernels under ``TRITON_INTERPRET=1`` (set in conftest; on CPU): forward
and the gradients of q, k, v and the table against the float64 reference, in fp32 and
bf16, over the gate regimes (dense, sparse, never saturating), GQA/MQA with shared and
per-head tables, odd lengths and lengths at the tile edges, non-causal; NaN rows; and the
backward's structure: the plain tiles' dK, dV without atomics.

Blocks are patched to 16 rows and keys, so short sequences still span many tiles (the
interpreter runs each program in numpy; the default 128 × 64 blocks are the GPU's).
Errors are relative, ‖x − ref‖ / ‖ref‖ per tensor: fp32 runs exact fp32 products
(``input_precision="ieee"``) and lands at 2e-7 to 1.2e-6, held to 1e-5; bf16 inputs are
rounded first and the reference sees the same rounded values, so what is left is the
kernels' bf16 roundings (2⁻⁹ per element) of the output, of P and dS before their
products, and of Δ = rowsum(dO ⊙ O), taken from the rounded output as FlashAttention
does: 3e-3 to 9e-3, and 1.7e-2 for dE with sparse gates (large q), held to 3e-2.
"""

import inspect
import math

import numpy as np
import pytest
import torch

from cope_megatron.ops.cope.reference import cope_attention_reference

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from cope_megatron.ops.cope import triton_kernels as triton_op  # noqa: E402

pytestmark = pytest.mark.triton

BLOCK = 16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

CASES = {
    # b, h, kv heads, seq, head_dim, npos, npos_max, shared table, causal, gates
    "dense_gqa_per_head": (1, 4, 2, 3 * BLOCK - 1, 16, 16, 8, False, True, "dense"),
    "sparse_wide_band": (1, 2, 2, 3 * BLOCK + 1, 16, 8, 3, False, True, "sparse"),
    "never_saturates": (1, 2, 1, 33, 8, 64, 64, True, True, "dense"),
    "one_partial_tile": (2, 2, 2, BLOCK - 3, 8, 4, 2, True, True, "dense"),
    "non_causal_mqa": (2, 2, 1, 2 * BLOCK, 8, 8, 5, False, False, "dense"),
    # the fp32 failure on the GPU (docs/GPU.md), scaled down: 4 query heads on 1 key head
    "mqa_4_to_1": (1, 4, 1, 6 * BLOCK, 16, 16, 16, True, True, "dense"),
}
BF16 = ("dense_gqa_per_head", "sparse_wide_band", "non_causal_mqa")  # both regimes, MQA


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triton_op, "BLOCK_M", BLOCK)
    monkeypatch.setattr(triton_op, "BLOCK_N", BLOCK)


@pytest.fixture(autouse=True)
def bf16_products(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 ``tl.dot`` operands as their raw 16-bit
    patterns (it stores bf16 as uint16 and widens only 8-bit floats), so every bf16 product
    came out ~1e9 off. Widened here exactly to fp32 first, as the GPU's tensor cores
    multiply them; the kernels' own roundings to bf16 stay as they are."""
    original = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, *args):
        return original(self, widen(a), widen(b), *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _inputs(b, h, g, s, d, npos, shared, gates, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, g, s, d, generator=gen, dtype=torch.float64) for _ in range(2))
    if gates == "sparse":  # a shared direction with opposite signs: logits about −4
        u = torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=torch.float64),
                                          dim=0)
        shift = math.sqrt(4 * math.sqrt(d)) * u
        q, k = q + shift, k - shift
    E = 0.5 * torch.randn(1 if shared else h, d, npos, generator=gen, dtype=torch.float64)
    return q, k, v, E


def relative_errors(case, dtype, seed=0) -> dict[str, float]:
    """‖x − ref‖ / ‖ref‖ of out, dq, dk, dv, dE; the reference on the rounded inputs."""
    b, h, g, s, d, npos, npos_max, shared, causal, gates = case
    fast = [t.to(dtype).requires_grad_() for t in _inputs(b, h, g, s, d, npos, shared, gates,
                                                         seed)]
    exact = [t.detach().double().requires_grad_() for t in fast]
    scale = 1 / math.sqrt(d)
    ref = cope_attention_reference(*exact, npos_max=npos_max, softmax_scale=scale,
                                   causal=causal)
    out = triton_op.cope_attention_triton(*fast, npos_max=npos_max, softmax_scale=scale,
                                          causal=causal)
    assert out.dtype == dtype and out.shape == ref.shape
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(dtype).double()
    want = torch.autograd.grad(ref, exact, grad)
    got = torch.autograd.grad(out, fast, grad.to(dtype))
    errors = {}
    for name, a, w in zip(["out", "dq", "dk", "dv", "dE"], (out, *got), (ref, *want)):
        assert a.shape == w.shape and a.isfinite().all(), name
        errors[name] = ((a.double() - w).norm() / w.norm()).item()
    return errors


@pytest.mark.parametrize("case, dtype", [
    pytest.param(case, dtype, id=f"{case}-{name}")
    for name, dtype, cases in (("fp32", torch.float32, CASES), ("bf16", torch.bfloat16, BF16))
    for case in cases])
def test_triton_matches_float64_reference(case, dtype):
    errors = relative_errors(CASES[case], dtype)
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.slow
def test_triton_failing_gpu_shape_at_full_size(monkeypatch):
    """The fp32 case that was 3% off in dq and dk on an H100 (docs/GPU.md), at its own size
    and the GPU's block shape: 4 query heads on 1 key head, 1500 tokens, head_dim 64, npos
    64 (about 100 s in the interpreter). out and dv as tight as the small cases allow at
    this length; dq, dk and dE to 1e-3: a few rows have a key whose position lies within
    fp32's resolution (4e-6 at 32-64) of an integer, where ∂b/∂p jumps from zd[n − 1] to
    zd[n], so fp32 positions take either side (4.5e-4 here, row 394 of head 1 at p =
    27 − 1e-6, before and after this kernel's restructuring; the chunked op 5e-5)."""
    monkeypatch.setattr(triton_op, "BLOCK_M", 128)
    monkeypatch.setattr(triton_op, "BLOCK_N", 64)
    errors = relative_errors((1, 4, 1, 1500, 64, 64, 64, True, True, "dense"), torch.float32)
    tolerance = {"out": 5e-5, "dv": 5e-5, "dq": 1e-3, "dk": 1e-3, "dE": 1e-3}
    assert all(errors[name] < tol for name, tol in tolerance.items()), errors


def test_triton_nan_input_gives_nan_rows_not_a_crash():
    """As the chunked op: a NaN in one query row (a diverged run) makes its positions NaN,
    which must not gather outside the table (``tl.minimum`` clamps them to the last one);
    that row, and only it, comes out NaN, forward and in dq (the other head, sharing
    nothing with it, stays finite)."""
    q, k, v, E = (t.float().requires_grad_() for t in
                  _inputs(1, 2, 2, 40, 8, 8, shared=True, gates="dense"))
    q.data[0, 0, 20, 0] = float("nan")
    out = triton_op.cope_attention_triton(q, k, v, E, npos_max=8, softmax_scale=0.3)
    assert out[0, 0, 20].isnan().all() and not out[0, 0, :20].isnan().any()
    assert not out[0, 1].isnan().any()
    out.sum().backward()
    assert q.grad[0, 0, 20].isnan().all() and not q.grad[0, 1].isnan().any()


def _band_tiles(saturation, seq: int, causal: bool) -> int:
    """(query block, key block) tiles of the near band over all heads, from the
    forward's record of plain key blocks."""
    rows = torch.arange(saturation.plain.shape[1])
    seen = torch.full_like(rows, -(-seq // BLOCK))
    if causal:
        seen = torch.div(torch.clamp((rows + 1) * BLOCK, max=seq) + BLOCK - 1, BLOCK,
                         rounding_mode="floor")
    return int((seen - saturation.plain).sum())


@pytest.mark.parametrize("carry", [0.0, 7.5], ids=["dense", "all_plain"])
def test_triton_plain_tiles_add_nothing_atomically(monkeypatch, carry):
    """The backward issues atomic adds for its near band's tiles only (dv, dz, dzd, dk:
    four per tile), none for the plain ones, whose dK and dV the keys kernel keeps in
    registers and stores; with a carry that has clamped every row, none at all. Counted
    at the interpreter's atomic op; and the keys kernel's source has no atomic. What the
    kernels store instead of adding (dK, dV, dq, Σ dp) they store whole."""
    source = inspect.getsource(triton_op._cope_bwd_keys.fn)
    assert "atomic" not in source and "add_block" not in source
    b, h, g, s, d, npos, npos_max = 1, 4, 2, 61, 16, 16, 8
    q, k, v, E = (t.float() for t in _inputs(b, h, g, s, d, npos, False, "dense"))
    z = q @ E.float()
    carry_in = torch.full(q.shape[:3], carry)
    bands: list = []
    out, lse = triton_op.chunk_forward(q, k, v, z, carry_in, scale=0.25, npos_max=npos_max,
                                       causal=True, bands=bands)
    band_tiles = _band_tiles(bands[0], s, causal=True)
    plain_tiles = int(bands[0].plain.sum())
    assert plain_tiles > 0 and (band_tiles > 0) == (carry == 0)

    calls = []
    original = interpreter.InterpreterBuilder.create_atomic_rmw

    def counting(self, *args, **kw):
        calls.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", counting)
    # Buffers the kernels store whole (dK, dV among them) start as NaN: none may be left.
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(math.nan))
    monkeypatch.setattr(torch, "empty_like",
                        lambda *a, **kw: empty_like(*a, **kw).fill_(math.nan))
    grads = tuple(torch.zeros_like(t) for t in (q, k, v, z))
    triton_op.chunk_backward(q, k, v, z, carry_in, torch.randn_like(out), out, lse, grads,
                             scale=0.25, npos_max=npos_max, causal=True, bands=bands)
    assert len(calls) == 4 * band_tiles
    assert all(t.isfinite().all() for t in grads)
