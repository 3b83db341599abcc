"""Public CoPE attention op with implementation dispatch.

    cope_attention(q, k, v, pos_emb, npos_max=None, softmax_scale=None, causal=True,
                   impl="auto", paths=None) -> [batch, heads, seq, head_dim]

Semantics (Golovneva et al. 2024, arXiv 2405.18719, Appendix B), per head, query i, key j:
    a_ij = scale · q_i·k_j                    (causal: −∞ for j > i)
    g_ij = σ(a_ij)                            (masked keys give 0)
    p_ij = min(Σ_{t=j..i} g_it, npos_max − 1) (non-causal: Σ over t = j..end)
    z_i  = q_i · E                            (E = pos_emb, unscaled)
    b_ij = frac(p)·z_i[⌈p⌉] + (1 − frac(p))·z_i[⌊p⌋]
    out_i = Σ_j softmax_j(a_ij + b_ij) · v_j
The authors' code also divides the position logits by √d; that is this function with E
scaled by 1/√d, so a table trained either way converts by a constant factor.

impl: "reference" (O(s²) memory, the ground truth), "chunked" (query blocks, recompute in
backward, O(s·(d + npos)) saved per head), "triton" (fused GPU kernels, opt-in), "auto"
(chunked). The Triton kernels are not the default on CUDA until the GPU suite passes on a
GPU: on the H100 one fp32 case gave dq and dk 3% off (docs/GPU.md). ``paths``
(``ops.cope.paths.Paths``, chunked only) forces the chunked op's device-dependent code, e.g.
``paths.CUDA`` runs CUDA's choice on a CPU; None: the device's own.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from cope_megatron.ops.cope.chunked import cope_attention_chunked
from cope_megatron.ops.cope.paths import Paths
from cope_megatron.ops.cope.reference import cope_attention_reference

Impl = Literal["auto", "reference", "chunked", "triton"]


def _check(q, k, v, pos_emb, npos_max) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, seq, head_dim]")
    b, h, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (s, d) or h % k.shape[1]:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} "
                         "(kv heads must divide query heads)")
    if pos_emb.dim() != 3 or pos_emb.shape[0] not in (1, h) or pos_emb.shape[1] != d:
        raise ValueError("pos_emb must be [heads or 1, head_dim, npos], got "
                         f"{tuple(pos_emb.shape)}")
    npos = pos_emb.shape[2]
    npos_max = npos if npos_max is None else npos_max
    if not 1 <= npos_max <= npos:
        raise ValueError(f"npos_max={npos_max} must be in [1, npos={npos}]")
    return npos_max


def resolve_impl(impl: Impl) -> Impl:
    """``auto`` becomes chunked (see the module docstring for why not triton on CUDA)."""
    return "chunked" if impl == "auto" else impl


def cope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_emb: torch.Tensor,
    *,
    npos_max: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    impl: Impl = "auto",
    paths: Paths | None = None,
) -> torch.Tensor:
    npos_max = _check(q, k, v, pos_emb, npos_max)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    impl = resolve_impl(impl)
    pos_emb = pos_emb.to(q.dtype)
    if paths is not None and impl != "chunked":
        raise ValueError(f"CoPE paths choose the chunked op's code, not impl {impl!r}")
    if impl == "reference":
        fn = cope_attention_reference
    elif impl == "chunked":
        fn = functools.partial(cope_attention_chunked, paths=paths)
    elif impl == "triton":
        from cope_megatron.ops.cope.triton_kernels import cope_attention_triton as fn
    else:
        raise ValueError(f"unknown CoPE impl {impl!r}; use auto, reference, chunked or triton")
    return fn(q, k, v, pos_emb, npos_max=npos_max, softmax_scale=scale, causal=causal)
