"""Memory per GPU of a run: model states by the ZeRO paper's accounting and the
activations each layer keeps for backward (the package docstring says how)."""

from __future__ import annotations

import torch

from cope_megatron.config import Config, Layout, padded_vocab_size
from cope_megatron.model import fusions
from cope_megatron.pe import ModelPE, PositionEncoding
from cope_megatron.pe.base import uses_flex

GIB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")
RESERVED_GIB = 3.0
"""Held back from the device's memory: CUDA context, NCCL buffers, allocator
fragmentation, kernel workspaces."""


def model_state_bytes(cfg: Config, params: int, layout: Layout) -> dict[str, float]:
    """Weights, gradients and optimizer state per GPU (module docstring)."""
    bf16 = cfg.train.precision == "bf16"
    weights, grads, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    n, stage = layout.replicas, layout.zero_stage
    return {
        "weights": params * weights / (n if stage >= 3 else 1),
        "gradients": params * grads / (n if stage >= 2 else 1),
        "optimizer": params * optim / (n if stage >= 1 else 1),
    }


def _layer_elements(cfg: Config, pe: PositionEncoding, layout: Layout, recompute: str
                    ) -> tuple[float, float]:
    """What one layer keeps for backward per token of this rank's sequence share: (elements
    in the training dtype, fp32 elements), besides any [s, s] logit bias."""
    m, p = cfg.model, cfg.parallel
    h, t = m.hidden_size, layout.tensor
    sp = t if p.sequence else 1
    head_dim = m.head_dim
    q = m.num_attention_heads * head_dim / t
    kv = 2 * m.query_groups * head_dim / t
    ffn = m.ffn_size / t
    if recompute == "full":  # the layer's input only
        return h / sp, 0.0
    # Both norms' inputs and outputs (the outputs are the next linear's input), the QKV
    # output, the attention output (the projection's input), the MLP's two hidden
    # activations. SDPA's q, k, v and output are views of these.
    saved = 4 * h / sp + q + kv + q + 2 * ffn
    if pe.rotary:
        # Rotated queries and keys, whole heads at any pe.rope.percent (Megatron joins the
        # unrotated rest back); scaling changes only the table.
        saved += q + kv / 2
    if cfg.pe.length_scale.type != "none":
        saved += q  # the scaled queries
    fp32 = 0.0
    if recompute == "none":  # the core attention's own state
        fp32 = q / head_dim  # the row log-sum-exp, one per head
        bf16 = cfg.train.precision == "bf16"
        if pe.uses_cope_op and bf16 and cfg.pe.cope.impl != "triton" and layout.context == 1:
            # The chunked op keeps fp32 copies of q, k, v and its output; nothing keeps
            # the bf16 q, k, v they were made from.
            fp32 += 2 * q + kv
            saved -= q + kv
        elif bf16 and (pe.fp32_output or layout.context > 1):
            fp32 += q  # the output, which every CP op keeps in fp32 for its merges too
    return saved, fp32


def activation_bytes(cfg: Config, pe: ModelPE, layout: Layout,
                     recompute: str | None = None, *,
                     vocab_size: int | None = None, device: str = "cuda") -> dict[str, float]:
    """Activation memory of one micro batch on one GPU: ``saved``, what stays alive for
    backward at the end of the forward, and ``working``, what backward recomputes for one
    layer at a time on top of it (``recompute`` defaults to the config's).

    Biased attention (ALiBi, T5, Kerple, FIRE) on the materialized bias keeps its
    [heads, s, s] bias per layer, and what computing it saved (FIRE's MLP activations,
    ``PositionEncoding.bias_saved``), and on the CPU, where SDPA with a bias runs its math
    path, the [b, heads, s, s] probabilities too; on FlexAttention (``pe.bias_kernel``) it
    keeps what flash does."""
    m = cfg.model
    recompute = recompute or cfg.train.recompute
    b = cfg.train.micro_batch_size
    seq = m.seq_length / layout.context
    tokens = b * seq
    e = 2 if cfg.train.precision == "bf16" else 4
    flex = uses_flex(cfg.pe.bias_kernel, device, m.attention_dropout)

    def layer(layer_pe: PositionEncoding, mode: str) -> float:
        saved, fp32 = _layer_elements(cfg, layer_pe, layout, mode)
        square = 0.0
        # Under CP the ring makes each row block's bias when it needs it and keeps none.
        if mode == "none" and layer_pe.biased and not flex and layout.context == 1:
            heads = m.num_attention_heads / layout.tensor
            square = heads * seq**2 * e * (1 + (b if device == "cpu" else 0))
            if layer_pe.bias_saved is not None:
                square += layer_pe.bias_saved(cfg) * seq**2 * 4
        return tokens * (saved * e + fp32 * 4) + square

    vocab = padded_vocab_size(vocab_size or cfg.data.vocab_size, layout.tensor) / layout.tensor
    # The final norm's input and output, and the fp32 softmax of the cross-entropy over
    # every token; the chunked loss keeps none, and its backward holds one chunk's logits
    # (fp32, and their gradient in the training dtype) while no layer recomputes.
    sp = layout.tensor if cfg.parallel.sequence else 1
    ends = tokens * 2 * m.hidden_size / sp * e
    layers = pe.per_layer(m.num_layers)
    # Backward recomputes one layer at a time: the largest one's extra is the peak.
    working = max({"none": 0.0, "selective": layer(p, "none") - layer(p, "selective"),
                   "full": layer(p, "none")}[recompute] for p in layers)
    if fusions.enabled(cfg.fusion, "cross_entropy", device):
        working = max(working, loss_chunk_tokens(cfg, layout) * vocab * (4 + e))
    else:
        ends += tokens * vocab * 4
    return {"saved": sum(layer(p, recompute) for p in layers) + ends, "working": working}


def loss_chunk_tokens(cfg: Config, layout: Layout) -> int:
    """Tokens of one chunk of the chunked loss on one rank (``ChunkedLossGPT``): whole
    positions of the micro batch, gathered over TP ranks under sequence parallelism."""
    b, seq = cfg.train.micro_batch_size, cfg.model.seq_length // layout.context
    ranks = layout.tensor if cfg.parallel.sequence else 1
    positions = max(1, cfg.fusion.chunk_tokens // (b * ranks))
    return min(positions * ranks, seq) * b


def saved_for_backward(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in the model's loss on
    ``tokens``, parameters excluded: the activation memory a forward leaves for its
    backward, measured (what ``activation_bytes`` estimates as ``saved``)."""
    from cope_megatron.model.gpt import loss_sum

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum(model, tokens)
    return sum(storages.values())
