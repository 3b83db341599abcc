"""Where CoPE's ops stop running its gate and position math: the chunked op's band width
per row group and the Triton kernels' plain key blocks leave to plain attention exactly the
keys whose float64 positions clamp, and give the reference's result where they do."""

import math

import pytest
import torch

from cope_megatron.ops.cope import chunked as cope_chunked
from cope_megatron.ops.cope.chunked import cope_attention_chunked
from cope_megatron.ops.cope.reference import cope_attention_reference
from tests.helpers import COPE_PATHS as PATHS


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
    return torch.sigmoid(a).flip(-1).cumsum(-1).flip(-1) + carry.double()[..., None]


NPOS_MAX = {"dense": 8, "sparse": 3, "sparse_cuda": 3, "never": 40, "carried": 8,
            "noncausal": 5}


def _band_case(regime: str):
    """(q, k, v, E, carry, the op's paths) in float64: 151 tokens (odd: the last band
    blocks are padded), 4 heads; ``never``: 32 tokens, fewer than npos_max; ``carried``:
    the first rows clamped by later chunks' carry, not the rest."""
    sparse = regime.startswith("sparse")
    paths = {"sparse_cuda": PATHS["eager_matmul"], "dense": PATHS["native"],
             "sparse": PATHS["native"]}.get(regime, PATHS["eager"])
    q, k, v, E = (t.double() for t in _triton_case(151, 16, 40, 40, heads=4, sparse=sparse))
    if regime == "never":
        q, k, v = (t[:, :, :32] for t in (q, k, v))
    carry = torch.zeros(q.shape[:3], dtype=torch.float64)
    if regime == "carried":
        carry[:, :, :60] += NPOS_MAX[regime]
    return q, k, v, E, carry, paths


def _check_totals(totals, pos, npos_max: int, regime: str) -> None:
    """The totals context parallelism's gate ring takes from the diagonal pairs: each row's
    carry plus all its gates (its first key's position), exact below the clamp."""
    below = pos[..., 0] <= npos_max - 1
    torch.testing.assert_close(totals[below], pos[..., 0][below], rtol=1e-10, atol=1e-10)
    assert bool((totals[~below] > npos_max - 1).all())
    assert (below.any() or regime in ("noncausal", "carried")) and ((~below).any()
                                                                   or regime == "never")


def _check_bands(bands, pos, npos_max: int, causal: bool, regime: str) -> None:
    """Every group's plain keys clamp, one key fewer would not, and the groups tile the
    rows in more than one size."""
    s = pos.shape[-1]
    rows, keys = torch.arange(s)[:, None], torch.arange(s)[None, :]
    starts, ends, widths = zip(*bands)
    assert starts == (0, *ends[:-1]) and ends[-1] == s
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


def _check_against_reference(out, q, k, v, E, npos_max: int, scale: float, causal: bool,
                             paths) -> None:
    """The pair's output, and the whole op's output and gradients, are the reference's."""
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
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    head_batches = []

    class Band(cope_chunked._Band):
        def __init__(self, heads, *args, **kwargs):
            head_batches.append(heads.stop - heads.start)
            super().__init__(heads, *args, **kwargs)

    monkeypatch.setattr(cope_chunked, "_Band", Band)
    for name, value in {"FAR_ROWS": 48, "BAND_ELEMENTS": 6000, "MIN_BAND_ROWS": 40,
                        "WIDE_BAND": 24, "WIDE_ROWS": 16}.items():
        monkeypatch.setattr(cope_chunked, name, value)
    causal, npos_max = regime != "noncausal", NPOS_MAX[regime]
    q, k, v, E, carry, paths = _band_case(regime)
    scale = 1 / math.sqrt(q.shape[-1])
    bands: list[tuple[int, int, int]] = []
    totals = torch.full(q.shape[:3], float("nan"), dtype=torch.float64)
    out, _ = cope_chunked.chunk_forward(q, k, v, q @ E, carry, scale=scale,
                                        npos_max=npos_max, causal=causal, block=8,
                                        bands=bands, paths=paths, totals=totals)
    pos = _positions(q, k, scale, causal, carry)
    _check_totals(totals, pos, npos_max, regime)
    _check_bands(bands, pos, npos_max, causal, regime)
    assert set(head_batches) == {"sparse": {2, 4}, "sparse_cuda": {1, 2, 3, 4}}.get(regime, {4})
    if regime == "carried":
        assert bands[0][2] < bands[-1][2]  # clamped rows need no band
        return  # a carry has no single-rank reference: the context-parallel tests cover it
    _check_against_reference(out, q, k, v, E, npos_max, scale, causal, paths)
