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


PATHS = {
    "eager": cope_paths.Paths(band="eager", far="flash", thread_heads=True),
    "native": cope_paths.Paths(band="native", far="flash", thread_heads=True),  # CPU's auto
    "eager_matmul": cope_paths.Paths(band="eager", far="matmul", thread_heads=False),
    "cuda": cope_paths.CUDA,  # CUDA's auto from COMPILE_MIN_SEQ keys on, at any length here
}
"""Every device-dependent choice of the chunked op, on this CPU: CUDA's below
``COMPILE_MIN_SEQ`` keys (eager band, matmul far keys) and above it (``CUDA``: torch.compile,
whose Inductor emits C++ here instead of Triton: the same graph, another backend)."""

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


def _triton_case(seq, d, npos, npos_max, *, sparse, seed=0, heads=2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, d, generator=gen) for _ in range(3))
    if sparse:  # a shared direction with opposite signs: logits about −4, gates about 0.02
        u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
        shift = math.sqrt(4 * math.sqrt(d)) * u
        q, k = q + shift, k - shift
    E = torch.randn(heads, d, npos, generator=gen)
    return q, k, v, E


def _expected_plain_blocks(q, k, carry, npos_max, block):
    """Per (head, query block): the key blocks, counted from the diagonal back, after which
    every row's gate total (float64) exceeds npos_max − 1."""
    s = q.shape[2]
    a = (q[0].double() @ k[0].double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    g = torch.sigmoid(a).tril()
    counts = []
    for h in range(q.shape[1]):
        row = []
        for m0 in range(0, s, block):
            m1 = min(s, m0 + block)
            n_blocks = -(-m1 // block)
            total = carry[0, h, m0:m1].double().clone()
            gate = 0
            while gate < n_blocks and not bool((total > npos_max - 1).all()):
                n0 = (n_blocks - 1 - gate) * block
                total += g[h, m0:m1, n0:n0 + block].sum(-1)
                gate += 1
            row.append(n_blocks - gate)
        counts.append(row)
    return torch.tensor(counts, dtype=torch.int32)


@pytest.mark.triton
@pytest.mark.parametrize("regime", ["dense", "sparse", "never", "carried"])
def test_triton_skips_exactly_the_clamped_key_blocks(monkeypatch, regime):
    """Key blocks whose rows have all clamped run as plain attention: exactly those (count
    against a float64 scan of the gates), and the result stays the reference's. Regimes:
    dense gates (the band ends a few blocks from the diagonal), sparse gates (late or never),
    npos_max beyond the sequence (never), and a carry from later chunks that has clamped
    every row already (all blocks plain, the diagonal one too)."""
    pytest.importorskip("triton")
    from cope_megatron.ops.cope import chunked as cope_chunked
    from cope_megatron.ops.cope import triton_kernels as triton_op

    block = 16
    monkeypatch.setattr(triton_op, "BLOCK_M", block)
    monkeypatch.setattr(triton_op, "BLOCK_N", block)
    seq, d, npos = 150, 16, 40
    npos_max = {"dense": 8, "sparse": 2, "never": 40, "carried": 8}[regime]
    q, k, v, E = _triton_case(seq, d, npos, npos, sparse=regime == "sparse")
    if regime == "never":
        q, k, v, E = _triton_case(32, d, npos, npos, sparse=False)
    carry = torch.zeros(q.shape[:3])
    if regime == "carried":
        carry += npos_max - 0.5
    scale = 1 / math.sqrt(d)
    z = q @ E
    out, lse, saturation = triton_op.forward_blocks(q, k, v, z, carry, scale=scale,
                                                    npos_max=npos_max, causal=True)
    plain = saturation.plain
    expected = _expected_plain_blocks(q, k, carry, npos_max, block)
    assert torch.equal(plain, expected)
    n_blocks = torch.tensor([-(-min(seq, m0 + block) // block) for m0 in range(0, q.shape[2],
                                                                                 block)])
    if regime == "never":
        assert not plain.any()
    elif regime == "carried":
        assert torch.equal(plain, n_blocks.expand_as(plain).int())
    else:  # some blocks plain, some not
        assert plain.any() and (plain < n_blocks).any()

    bands: list[tuple[int, int, int]] = []
    want_out, want_lse = cope_chunked.chunk_forward(q, k, v, z, carry, scale=scale,
                                                    npos_max=npos_max, causal=True,
                                                    bands=bands)
    torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, want_lse, rtol=2e-5, atol=2e-5)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, mod, kw in (("triton", triton_op, {"bands": [saturation]}),
                          ("chunked", cope_chunked, {"bands": bands})):
        acc = tuple(torch.zeros_like(t) for t in (q, k, v, z))
        dp_sum = mod.chunk_backward(q, k, v, z, carry, d_out, want_out, want_lse, acc,
                                    scale=scale, npos_max=npos_max, causal=True, **kw)
        grads[name] = (*acc, dp_sum)
    # dz at the last position and Σ dp are sums of signed terms that cancel (the former to
    # 0 exactly, as Σ_j softmax_ij·(dO_i·v_j − Δ_i) = 0): an absolute floor, not relative.
    for name, got, want in zip("dq dk dv dz dp_sum".split(), grads["triton"],
                               grads["chunked"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _positions(q, k, scale, causal, carry):
    """float64 raw positions Σ_{t=j..i} g_it (+ carry) for every (row, key)."""
    a = scale * q.double() @ k.double().transpose(-1, -2)
    if causal:
        a = a.masked_fill(torch.ones(a.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return reverse_cumsum_rows(torch.sigmoid(a)) + carry.double()[..., None]


@pytest.mark.parametrize("regime", ["dense", "sparse", "sparse_cuda", "never", "carried",
                                    "noncausal"])
def test_chunked_plain_keys_are_exactly_clamped_ones(monkeypatch, request, regime):
    """Each group's band width W (``bands``) is the smallest that leaves to plain attention
    only keys whose float64 positions exceed npos_max − 1 for their row (causal: keys
    j ≤ i − W; a key chunk before the rows: keys before its last W), plain keys exist
    exactly when positions clamp, and the result is the reference's, forward and backward.
    Small groups, batches and wide-band sizes make every path run: several groups (smaller
    once bands are wide), widths retried and carried over, narrow bands' blocks batched,
    wide bands' heads split (two at a time, the threads; as many as the budget allows,
    with CUDA's choices in ``sparse_cuda``); two regimes run the C++ kernel, on two
    threads."""
    from cope_megatron.ops.cope import chunked as cope_chunked

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    head_batches = []

    class Band(cope_chunked._Band):
        def __init__(self, heads, *args, **kwargs):
            head_batches.append(heads.stop - heads.start)
            super().__init__(heads, *args, **kwargs)

    monkeypatch.setattr(cope_chunked, "_Band", Band)
    monkeypatch.setattr(cope_chunked, "FAR_ROWS", 48)
    monkeypatch.setattr(cope_chunked, "BAND_ELEMENTS", 6000)
    monkeypatch.setattr(cope_chunked, "MIN_BAND_ROWS", 40)
    monkeypatch.setattr(cope_chunked, "WIDE_BAND", 24)
    monkeypatch.setattr(cope_chunked, "WIDE_ROWS", 16)
    seq, d, npos = 151, 16, 40  # odd: the last band blocks are padded
    causal = regime != "noncausal"
    npos_max = {"dense": 8, "sparse": 3, "sparse_cuda": 3, "never": 40, "carried": 8,
                "noncausal": 5}[regime]
    sparse = regime.startswith("sparse")
    paths = {"sparse_cuda": PATHS["eager_matmul"], "dense": PATHS["native"],
             "sparse": PATHS["native"]}.get(regime, PATHS["eager"])
    q, k, v, E = (t.double() for t in _triton_case(seq, d, npos, npos, heads=4,
                                                    sparse=sparse))
    if regime == "never":
        q, k, v, E = (t[:, :, :32] if t.dim() == 4 else t for t in (q, k, v, E))
    carry = torch.zeros(q.shape[:3], dtype=torch.float64)
    if regime == "carried":
        carry[:, :, :60] += npos_max  # the first rows clamped by later chunks, not the rest
    scale = 1 / math.sqrt(d)
    z = q @ E
    bands: list[tuple[int, int, int]] = []
    totals = torch.full(q.shape[:3], float("nan"), dtype=torch.float64)
    out, lse = cope_chunked.chunk_forward(q, k, v, z, carry, scale=scale, npos_max=npos_max,
                                          causal=causal, block=8, bands=bands, paths=paths,
                                          totals=totals)
    s = q.shape[2]
    pos = _positions(q, k, scale, causal, carry)
    # The totals context parallelism's gate ring takes from the diagonal pairs: each row's
    # carry plus all its gates (its first key's position), exact below the clamp.
    below = pos[..., 0] <= npos_max - 1
    torch.testing.assert_close(totals[below], pos[..., 0][below], rtol=1e-10, atol=1e-10)
    assert bool((totals[~below] > npos_max - 1).all())
    assert (below.any() or regime in ("noncausal", "carried")) and ((~below).any()
                                                                   or regime == "never")
    rows = torch.arange(s)[:, None]
    keys = torch.arange(s)[None, :]
    starts, ends, widths = zip(*bands)
    assert starts == (0, *ends[:-1]) and ends[-1] == s  # the groups tile the rows
    assert len(set(e - r for r, e in zip(starts, ends))) > 1 or regime == "never"
    for r0, r1, width in bands:
        plain = (keys <= rows - width if causal else keys < s - width).expand(s, s)[r0:r1]
        seen = keys <= rows if causal else torch.ones(s, s, dtype=torch.bool)
        assert bool((pos[:, :, r0:r1][..., plain] > npos_max - 1).all())
        if width:  # one key less would leave an unclamped key to the plain path
            narrower = (keys == rows - width + 1) if causal else (keys == s - width)
            edge = (narrower & seen).expand(s, s)[r0:r1]
            assert bool((pos[:, :, r0:r1][..., edge] <= npos_max - 1).any())
    plain_keys = sum(sum(max(0, i - width + 1) for i in range(r0, r1)) if causal
                     else (r1 - r0) * (s - width) for r0, r1, width in bands)
    assert (plain_keys > 0) == (regime != "never"), widths
    assert set(head_batches) == {"sparse": {2, 4}, "sparse_cuda": {1, 2, 3, 4}}.get(regime, {4})
    if regime == "carried":
        assert widths[0] < widths[-1]  # clamped rows need no band
        return  # a carry has no single-rank reference: the context-parallel tests cover it
    params = [t.clone().requires_grad_() for t in (q, k, v, E)]
    ref_params = [t.clone().requires_grad_() for t in (q, k, v, E)]
    got = cope_attention_chunked(*params, npos_max=npos_max, softmax_scale=scale,
                                 causal=causal, block=8, paths=paths)
    want = cope_attention_reference(*ref_params, npos_max=npos_max, softmax_scale=scale,
                                    causal=causal)
    torch.testing.assert_close(out, want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64)
    for name, a, w in zip("q k v pos_emb".split(), torch.autograd.grad(got, params, grad),
                          torch.autograd.grad(want, ref_params, grad)):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def reverse_cumsum_rows(g: torch.Tensor) -> torch.Tensor:
    return g.flip(-1).cumsum(-1).flip(-1)


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
