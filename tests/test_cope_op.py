"""CoPE op: the reference against the paper's formula written as loops, every other impl
against the float64 reference (forward and all four gradients), gradcheck, bf16."""

import math

import pytest
import torch

from cope_megatron.ops import cope_attention, native_build
from cope_megatron.ops.cope import blocks as cope_blocks
from cope_megatron.ops.cope import native as cope_native
from cope_megatron.ops.cope import paths as cope_paths
from cope_megatron.ops.cope.chunked import cope_attention_chunked
from cope_megatron.ops.cope.reference import cope_attention_reference
from tests.helpers import COPE_PATHS as PATHS


def paper_loops(q, k, v, E, npos_max, scale, causal):
    """Appendix B, one query, one key at a time."""
    b, h, s, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kh, vh = k[bi, hi // rep], v[bi, hi // rep]
            table = E[hi if E.shape[0] > 1 else 0]
            for i in range(s):
                keys = range(i + 1) if causal else range(s)
                last = i if causal else s - 1
                a = {j: scale * q[bi, hi, i] @ kh[j] for j in keys}
                z = q[bi, hi, i] @ table
                logits = []
                for j in keys:
                    p = min(sum(torch.sigmoid(a[t]) for t in range(j, last + 1)), npos_max - 1)
                    lo, hi_ = math.floor(p), math.ceil(p)
                    logits.append(a[j] + (p - lo) * z[hi_] + (1 - (p - lo)) * z[lo])
                w = torch.softmax(torch.stack(logits), 0)
                out[bi, hi, i] = sum(w[n] * vh[j] for n, j in enumerate(keys))
    return out


def inputs(b, h, g, s, d, npos, shared, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, g, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, g, s, d, generator=gen, dtype=torch.float64)
    E = torch.randn(1 if shared else h, d, npos, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, E)]


@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_the_paper_formula(causal):
    q, k, v, E = inputs(2, 4, 2, 7, 3, 4, shared=False)
    want = paper_loops(q, k, v, E, npos_max=3, scale=0.7, causal=causal)
    got = cope_attention_reference(q, k, v, E, npos_max=3, softmax_scale=0.7, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


CASES = [
    # b, h, g, s, d, npos, npos_max, shared, causal, block
    (2, 4, 4, 37, 8, 16, 16, False, True, 8),   # seq not a multiple of the block
    (1, 4, 2, 29, 8, 8, 5, True, True, 16),     # GQA, shared table, clamping bites
    (2, 2, 1, 21, 4, 32, 32, False, False, 8),  # non-causal, multi-query
    (1, 2, 2, 40, 8, 4, 4, True, True, 64),     # one block, strong clamping
    (1, 4, 2, 45, 8, 4, 2, False, True, 8),     # clamps one block from the diagonal
    (1, 2, 1, 33, 8, 64, 64, True, True, 8),    # npos_max beyond the sequence: never clamps
    (2, 2, 2, 30, 8, 8, 3, False, False, 8),    # non-causal, clamping
]


def _compare(impl_fn, case, rtol, atol, dtype=torch.float64):
    b, h, g, s, d, npos, npos_max, shared, causal, block = case
    q, k, v, E = inputs(b, h, g, s, d, npos, shared, dtype)
    qr, kr, vr, Er = (t.detach().double().requires_grad_() for t in (q, k, v, E))
    scale = 1 / math.sqrt(d)
    ref = cope_attention_reference(qr, kr, vr, Er, npos_max=npos_max, softmax_scale=scale,
                                   causal=causal)
    out = impl_fn(q, k, v, E, npos_max=npos_max, softmax_scale=scale, causal=causal, block=block)
    assert out.dtype == q.dtype and out.shape == q.shape
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.autograd.grad(ref, (qr, kr, vr, Er), grad)
    got = torch.autograd.grad(out, (q, k, v, E), grad.to(dtype))
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    for name, a, w in zip("q k v pos_emb".split(), got, want):
        assert a.shape == w.shape, name
        torch.testing.assert_close(a.double(), w, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


COMPILED = {1, 2, 5}
"""The cases ``cuda`` runs by default (GQA with a shared table and clamping; non-causal
multi-query with a per-head table; never clamping): each compiles its own kernels, 10-40 s
apiece on two cores; the rest run with ``-m slow``."""


@pytest.mark.parametrize("paths, case", [
    pytest.param(name, case, id=f"{name}-case{i}",
                 marks=() if name != "cuda" or i in COMPILED else pytest.mark.slow)
    for name in PATHS for i, case in enumerate(CASES)])
def test_chunked_matches_reference(paths, case):
    """Every path the op takes on any device, forced on the CPU, forward and the grads of
    q, k, v and the table against the float64 reference. float64: what differs is the
    summation order (band vs plain keys, merged by log-sum-exp), ~1e-15 relative; 1e-9
    leaves room for the gradients' cancellations (dz at the clamp sums to ~0)."""
    def fn(*args, block, **kw):
        return cope_attention_chunked(*args, block=block, paths=PATHS[paths], **kw)

    _compare(fn, case, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES[:2])
@pytest.mark.parametrize("paths", [
    "eager", "native", "eager_matmul", pytest.param("cuda", marks=pytest.mark.slow)])
def test_chunked_float32_and_bfloat16(case, paths):
    """Every path in float32 and bf16 (the C++ kernel's float32 exp is its own
    polynomial). float32: a few ulps per op over ~40 keys, 1e-4 (~1000 ulps) covers the
    gradients' cancellations."""
    def fn(*args, block, **kw):
        return cope_attention_chunked(*args, block=block, paths=PATHS[paths], **kw)

    _compare(fn, case, rtol=1e-4, atol=1e-4, dtype=torch.float32)
    # bf16 inputs are computed in fp32; the error is bf16 rounding of inputs and outputs.
    _compare(fn, case, rtol=5e-2, atol=5e-2, dtype=torch.bfloat16)


def test_cpu_band_code_is_the_native_kernel_built_once(monkeypatch, request, tmp_path):
    """On CPU the fused band code is the C++ kernel, at any length; it is built once per
    machine into the cache, and where it cannot be built (no compiler, or one that fails)
    the band runs in torch, with a warning that says so."""
    cpu = torch.device("cpu")
    native = (cope_native.forward_block, cope_native.backward_block)
    eager = (cope_blocks.forward_block, cope_blocks.backward_block)
    assert cope_paths.Paths().resolve(cpu, 16) == PATHS["native"]
    assert cope_blocks.kernels("native") == native and cope_blocks.kernels("eager") == eager

    request.addfinalizer(cope_native.library.cache_clear)
    monkeypatch.setenv("COPE_MEGATRON_CACHE", str(tmp_path))
    cope_native.library.cache_clear()
    assert cope_native.library() is not None
    built, = tmp_path.glob("cope_band-*.so")
    stamp = built.stat().st_mtime_ns
    cope_native.library.cache_clear()
    assert cope_native.library() is not None and built.stat().st_mtime_ns == stamp

    monkeypatch.setenv("COPE_MEGATRON_CACHE", str(tmp_path / "failing"))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that exits 1
    cope_native.library.cache_clear()
    with pytest.warns(UserWarning, match="cope_band.cpp did not build"):
        assert cope_native.library() is None
    assert cope_paths.Paths().resolve(cpu, 16) == PATHS["eager"]  # below torch.compile's
    assert cope_paths.Paths().resolve(cpu, cope_paths.COMPILE_MIN_SEQ).band == "compiled"
    with pytest.raises(RuntimeError, match="did not build"):
        cope_paths.Paths(band="native").resolve(cpu, 16)
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    cope_native.library.cache_clear()
    with pytest.warns(UserWarning, match="no C.. compiler"):
        assert cope_native.library() is None


@pytest.mark.parametrize("paths", ["eager", "native"])
def test_chunked_nan_input_gives_nan_rows_not_a_crash(paths):
    """A diverged run's NaN reaches the band math as a NaN position, which must not index
    outside the table: the row comes out NaN, for the non-finite guard to see."""
    q, k, v, E = inputs(1, 2, 2, 40, 8, 8, shared=True, dtype=torch.float32)
    q.data[0, 0, 20, 0] = float("nan")
    out = cope_attention_chunked(q, k, v, E, npos_max=8, softmax_scale=0.3,
                                 paths=PATHS[paths])
    assert out[0, 0, 20].isnan().all() and not out[0, 0, :20].isnan().any()
    out.sum().backward()
    assert q.grad[0, 0, 20].isnan().all() and not q.grad[0, 1].isnan().any()


def test_chunked_gradcheck():
    q, k, v, E = inputs(1, 2, 1, 11, 3, 5, shared=False)
    fn = lambda q, k, v, E: cope_attention_chunked(  # noqa: E731
        q, k, v, E, npos_max=4, softmax_scale=0.5, block=4, paths=PATHS["eager"])
    assert torch.autograd.gradcheck(fn, (q, k, v, E))


def test_public_api_defaults_and_errors():
    q, k, v, E = inputs(1, 2, 2, 9, 4, 6, shared=True, dtype=torch.float32)
    out = cope_attention(q, k, v, E)  # scale 1/√d, npos_max = npos, auto impl
    ref = cope_attention_reference(q, k, v, E, npos_max=6, softmax_scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="npos_max"):
        cope_attention(q, k, v, E, npos_max=7)
    with pytest.raises(ValueError, match="pos_emb"):
        cope_attention(q, k, v, E[:, :2])
    with pytest.raises(ValueError, match="kv heads"):
        cope_attention(q, k[:, :, :5], v[:, :, :5], E)
    with pytest.raises(ValueError, match="unknown CoPE impl"):
        cope_attention(q, k, v, E, impl="magic")


def test_auto_paths_per_device(monkeypatch):
    """What ``auto`` runs (``Paths()`` resolved): on CPU the C++ kernel, the flash kernel,
    head batches by threads; on CUDA eager bands below ``COMPILE_MIN_SEQ`` keys and ``CUDA``
    from there on (eager throughout without Triton), matmul far keys; a choice given is
    kept; the CPU-only choices are refused on CUDA, and paths for another impl."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    Paths, at = cope_paths.Paths, cope_paths.COMPILE_MIN_SEQ
    assert Paths().resolve(cpu, at) == PATHS["native"]
    monkeypatch.setattr(cope_paths, "can_compile", lambda device_type: True)
    assert Paths().resolve(cuda, at - 1) == PATHS["eager_matmul"]
    assert Paths().resolve(cuda, at) == cope_paths.CUDA
    assert Paths(band="eager").resolve(cuda, at) == PATHS["eager_matmul"]
    assert Paths(far="matmul").resolve(cpu, 16) == Paths("native", "matmul", True)
    monkeypatch.setattr(cope_paths, "can_compile", lambda device_type: False)
    assert Paths().resolve(cuda, at) == PATHS["eager_matmul"]
    for cpu_only in (Paths(band="native"), Paths(far="flash")):
        with pytest.raises(ValueError, match="CPU only"):
            cpu_only.resolve(cuda, 16)
    q, k, v, E = inputs(1, 2, 2, 9, 4, 6, shared=True)
    with pytest.raises(ValueError, match="chunked op's code"):
        cope_attention(q, k, v, E, impl="reference", paths=cope_paths.CUDA)


def test_open_gates_count_tokens():
    """With every gate open, the CoPE position of key j for query i is i − j + 1 (the
    relative position, counted in tokens), clamped at npos_max − 1."""
    from cope_megatron.ops.cope.reference import reverse_cumsum

    g = torch.ones(5, 5).tril()
    p = reverse_cumsum(g)
    assert p[4].tolist() == [5, 4, 3, 2, 1]
    assert p.clamp(max=2)[4].tolist() == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_math_path_matches_the_fused_kernel(monkeypatch, causal):
    """Off the CPU the plain part runs as matrix products in row chunks: the same (out, lse)
    and gradients as the CPU flash kernel, causal aligned at the top left too."""
    from cope_megatron.ops import plain_attention as pa

    monkeypatch.setattr(pa, "MATH_ROWS", 7)
    gen = torch.Generator().manual_seed(0)
    q, d_out = (torch.randn(1, 2, 23, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_shift = torch.randn(1, 2, 23, generator=gen, dtype=torch.float64)
    want_out, want_lse = pa.attention_with_lse(q, k, v, 0.3, causal, flash=True)
    got_out, got_lse = pa.attention_with_lse(q, k, v, 0.3, causal, flash=False)
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-10, atol=1e-10)
    # Backward against a row's whole lse and output, as the CoPE op calls it.
    args = (d_out, q, k, v, want_out, want_lse + lse_shift, 0.3, causal)
    for got, want in zip(pa.attention_backward(*args, flash=False),
                         pa.attention_backward(*args, flash=True)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
