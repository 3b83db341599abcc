"""Will a run fit, and what will it cost: parameters, FLOPs per token and memory per GPU,
from a config alone, before any node is booked.

Written here because the model is ours (Megatron-Core's local GPT layer with a PE's core
attention) and DeepSpeed's estimators (``estimate_zero*_model_states_mem_needs``) count
model states only: activations depend on what our layers save for backward.

- Parameters are counted from the shapes Megatron-Core builds, per tensor-parallel rank
  (vocabulary and column-parallel weights split, row-parallel biases and norms
  replicated); a PE's own parameters come from building its attention on the meta device.
- Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, §3): bf16
  training holds 2 bytes of weights and 2 of gradients per parameter and 12 of optimizer
  state (fp32 master, Adam's two moments); fp32 holds 4 + 4 + 8. ZeRO-1 splits the
  optimizer state over the replicas (DP × CP), ZeRO-2 the gradients too, ZeRO-3 the
  weights too.
- Activations are what each layer keeps for backward, in elements per token of this
  rank's share of the sequence (``activation_bytes``), measured against autograd's saved
  tensors in tests/test_estimate.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cope_megatron.config import Config, padded_vocab_size
from cope_megatron.flops import PEAK_TFLOPS, FlopsPerToken, flops_per_token
from cope_megatron.pe import get_pe
from cope_megatron.pe.base import AttentionShape, CausalAttention, default_softmax_scale

GIB = 2**30
RECOMPUTE_MODES = ("none", "selective", "full")
RESERVED_GIB = 3.0
"""Held back from the device's memory: CUDA context, NCCL buffers, allocator
fragmentation, kernel workspaces."""
REFERENCE_GPU_GIB = 80.0
REFERENCE_PEAK_TFLOPS = PEAK_TFLOPS["H100"]
"""What an estimate assumes without a GPU to ask: an 80 GiB H100 (dense bf16 peak)."""


@dataclass(frozen=True)
class Layout:
    gpus: int
    tensor: int
    context: int
    zero_stage: int

    @property
    def data(self) -> int:
        return self.gpus // (self.tensor * self.context)

    @property
    def replicas(self) -> int:
        """Ranks ZeRO partitions over: data × context parallel."""
        return self.data * self.context


def layout_of(cfg: Config, gpus: int) -> Layout:
    return Layout(gpus=gpus, tensor=cfg.parallel.tensor, context=cfg.parallel.context,
                  zero_stage=cfg.zero.stage)


# -- parameters ---------------------------------------------------------------------------


def pe_parameters(cfg: Config, tensor: int = 1) -> int:
    """Parameters of one layer's PE attention on one TP rank (CoPE's table, T5's buckets),
    counted on the meta device."""
    m = cfg.model
    heads = m.num_attention_heads // tensor
    head_dim = m.hidden_size // m.num_attention_heads
    shape = AttentionShape(
        num_heads=heads, num_kv_heads=(m.num_query_groups or m.num_attention_heads) // tensor,
        head_dim=head_dim, total_heads=m.num_attention_heads, head_offset=0,
        softmax_scale=default_softmax_scale(head_dim), dropout=0.0,
        train_length=m.seq_length, init_std=m.init_method_std, tp_size=tensor)
    with torch.device("meta"):
        module = get_pe(m.pe).attention(shape, cfg.pe)
    return sum(p.numel() for p in module.parameters())


def parameters(cfg: Config, vocab_size: int, tensor: int = 1) -> int:
    """Parameters held by one TP rank (all of them for ``tensor`` = 1)."""
    m = cfg.model
    h, t = m.hidden_size, tensor
    head_dim = h // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    ffn = m.ffn_hidden_size or 4 * h
    qkv_out = (m.num_attention_heads + 2 * groups) * head_dim
    norm = 2 * h if m.normalization == "LayerNorm" else h
    layer = (
        2 * norm
        + (h * qkv_out + qkv_out) // t  # column parallel: weight and bias split
        + m.num_attention_heads * head_dim * h // t + h  # row parallel: bias replicated
        + (h * ffn + ffn) // t
        + ffn * h // t + h
        + pe_parameters(cfg, t)
    )
    vocab = padded_vocab_size(vocab_size, t) // t * h
    pe = get_pe(m.pe)
    # A fixed encoding replaces GPTModel's learned table with a module without parameters.
    learned = (m.seq_length * h if pe.gpt_position_embedding == "learned_absolute"
               and pe.position_embedding is None else 0)
    return (m.num_layers * layer + norm + vocab * (1 if not m.untie_embeddings else 2)
            + learned)


# -- memory -------------------------------------------------------------------------------


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


def _layer_elements(cfg: Config, tensor: int, recompute: str) -> tuple[float, float]:
    """What one layer keeps for backward per token of this rank's sequence share: (elements
    in the training dtype, fp32 elements), besides any [s, s] logit bias."""
    m, p = cfg.model, cfg.parallel
    h, t = m.hidden_size, tensor
    sp = t if p.sequence else 1
    head_dim = h // m.num_attention_heads
    q = m.num_attention_heads * head_dim / t
    kv = 2 * (m.num_query_groups or m.num_attention_heads) * head_dim / t
    ffn = (m.ffn_hidden_size or 4 * h) / t
    if recompute == "full":  # the layer's input only
        return h / sp, 0.0
    # Both norms' inputs and outputs (the outputs are the next linear's input), the QKV
    # output, the attention output (the projection's input), the MLP's two hidden
    # activations. SDPA's q, k, v and output are views of these.
    saved = 4 * h / sp + q + kv + q + 2 * ffn
    if get_pe(m.pe).gpt_position_embedding == "rope":
        saved += q + kv / 2  # rotated queries and keys
    fp32 = 0.0
    if recompute == "none":  # the core attention's own state
        fp32 = q / head_dim  # the row log-sum-exp, one per head
        if (m.pe.startswith("cope") and cfg.train.precision == "bf16"
                and cfg.pe.cope.impl != "triton"):
            fp32 += 2 * q + kv  # the chunked op's fp32 copies of q, k, v and its output
    return saved, fp32


def _biased(pe_name: str) -> bool:
    """Whether the PE's attention adds a distance bias to the logits (ALiBi, T5)."""
    attention = get_pe(pe_name).attention
    return (issubclass(attention, CausalAttention)
            and attention.distance_bias is not CausalAttention.distance_bias)


def activation_bytes(cfg: Config, layout: Layout, recompute: str | None = None, *,
                     vocab_size: int | None = None, device: str = "cuda") -> dict[str, float]:
    """Activation memory of one micro batch on one GPU: ``saved``, what stays alive for
    backward at the end of the forward, and ``working``, what backward recomputes for one
    layer at a time on top of it (``recompute`` defaults to the config's).

    Biased attention (ALiBi, T5) keeps its [heads, s, s] bias per layer, and on the CPU,
    where SDPA with a bias runs its math path, the [b, heads, s, s] probabilities too."""
    m = cfg.model
    recompute = recompute or cfg.train.recompute
    b = cfg.train.micro_batch_size
    seq = m.seq_length / layout.context
    tokens = b * seq
    e = 2 if cfg.train.precision == "bf16" else 4

    def layer(mode: str) -> float:
        saved, fp32 = _layer_elements(cfg, layout.tensor, mode)
        square = 0.0
        if mode == "none" and _biased(m.pe):
            heads = m.num_attention_heads / layout.tensor
            square = heads * seq**2 * e * (1 + (b if device == "cpu" else 0))
        return tokens * (saved * e + fp32 * 4) + square

    vocab = padded_vocab_size(vocab_size or cfg.data.vocab_size, layout.tensor) / layout.tensor
    # The final norm's input and output, and the fp32 logits of the cross-entropy.
    sp = layout.tensor if cfg.parallel.sequence else 1
    ends = tokens * (2 * m.hidden_size / sp * e + vocab * 4)
    working = {"none": 0.0, "selective": layer("none") - layer("selective"),
               "full": layer("none")}[recompute]
    return {"saved": m.num_layers * layer(recompute) + ends, "working": working}


# -- the estimate -------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    cfg: Config
    layout: Layout
    params: int
    params_per_rank: int
    flops: FlopsPerToken
    memory: dict[str, float]
    """Bytes per GPU: weights, gradients, optimizer, activations (saved + working)."""
    activations: dict[str, float]
    """Activation bytes per GPU under each recomputation mode."""
    gpu_memory_gib: float
    vocab_size: int
    device: str

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values()) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory_gib - RESERVED_GIB


def estimate(cfg: Config, gpus: int, gpu_memory_gib: float | None = None, *,
             vocab_size: int | None = None, device: str = "cuda") -> Estimate:
    """The estimate for ``cfg`` on ``gpus`` GPUs of ``gpu_memory_gib`` each (None:
    ``REFERENCE_GPU_GIB``); the vocabulary defaults to ``data.vocab_size``."""
    if gpu_memory_gib is None:
        gpu_memory_gib = REFERENCE_GPU_GIB
    layout = layout_of(cfg, gpus)
    vocab = vocab_size or cfg.data.vocab_size
    per_rank = parameters(cfg, vocab, layout.tensor)
    acts = {mode: sum(activation_bytes(cfg, layout, mode, vocab_size=vocab,
                                       device=device).values())
            for mode in RECOMPUTE_MODES}
    memory = {**model_state_bytes(cfg, per_rank, layout),
              "activations": acts[cfg.train.recompute]}
    return Estimate(cfg=cfg, layout=layout, params=parameters(cfg, vocab), params_per_rank=per_rank,
                    flops=flops_per_token(cfg, padded_vocab_size(vocab, 1)), memory=memory,
                    activations=acts, gpu_memory_gib=gpu_memory_gib, vocab_size=vocab,
                    device=device)


def _changes(cfg: Config, gpus: int) -> list[tuple[str, Config]]:
    """Single changes that lower memory per GPU, cheapest in throughput first."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    out = []

    def changed(section: str, **values) -> Config:
        return dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})

    if cfg.zero.stage < 3 and gpus // (p.tensor * p.context) * p.context > 1:
        stage = cfg.zero.stage + 1
        out.append((f"zero.stage={stage}", changed("zero", stage=stage)))
    for mode in RECOMPUTE_MODES[RECOMPUTE_MODES.index(t.recompute) + 1:]:
        out.append((f"train.recompute={mode}", changed("train", recompute=mode)))
    if t.micro_batch_size > 1 and t.micro_batch_size % 2 == 0:
        out.append((f"train.micro_batch_size={t.micro_batch_size // 2} "
                    f"train.grad_accum={2 * t.grad_accum}",
                    changed("train", micro_batch_size=t.micro_batch_size // 2,
                            grad_accum=2 * t.grad_accum)))
    groups = m.num_query_groups or m.num_attention_heads
    tp = 2 * p.tensor
    if tp <= 8 and gpus % (tp * p.context) == 0 and groups % tp == 0:
        out.append((f"parallel.tensor={tp} parallel.sequence=true",
                    changed("parallel", tensor=tp, sequence=True)))
    cp = 2 * p.context
    if gpus % (p.tensor * cp) == 0 and m.seq_length % (2 * cp) == 0:
        out.append((f"parallel.context={cp}", changed("parallel", context=cp)))
    return out


def smallest_fitting_change(est: Estimate, max_changes: int = 3
                            ) -> tuple[str, Estimate] | None:
    """The fewest changes (cheapest first at each count) after which the run fits, as the
    overrides to add, with the estimate it gives; None when nothing up to ``max_changes``
    does."""
    gpus = est.layout.gpus
    frontier = [("", est.cfg)]
    for _ in range(max_changes):
        next_frontier = []
        for overrides, base in frontier:
            for change, new in _changes(base, gpus):
                done = f"{overrides} {change}".strip()
                result = estimate(new, gpus, est.gpu_memory_gib, vocab_size=est.vocab_size,
                                  device=est.device)
                if result.fits:
                    return done, result
                next_frontier.append((done, new))
        frontier = next_frontier
    return None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def summary(est: Estimate, *, mfu: float = 0.4, peak_tflops: float | None = None,
            fit: bool = True) -> str:
    """The estimate for a reader: counts, memory per GPU, training time at an assumed MFU
    of ``peak_tflops`` (None: ``REFERENCE_PEAK_TFLOPS``) and (``fit``) whether it fits, or
    the smallest change that makes it fit."""
    cfg, lay, f = est.cfg, est.layout, est.flops
    if peak_tflops is None:
        peak_tflops = REFERENCE_PEAK_TFLOPS
    t = cfg.train
    tokens = t.steps * t.micro_batch_size * t.grad_accum * lay.data * cfg.model.seq_length
    hours = tokens * f.model / (lay.gpus * peak_tflops * 1e12 * mfu) / 3600
    acts = ", ".join(f"{mode} {_gib(b)}" for mode, b in est.activations.items())
    lines = [
        f"model: {cfg.model.pe}, {est.params / 1e6:,.1f}M parameters, "
        f"{est.params_per_rank / 1e6:,.1f}M per tensor-parallel rank",
        f"layout: {lay.gpus} GPUs = TP {lay.tensor} x CP {lay.context} x DP {lay.data}, "
        f"ZeRO-{lay.zero_stage}, {t.precision}, micro batch {t.micro_batch_size} x "
        f"{cfg.model.seq_length} tokens, recompute {t.recompute}",
        f"FLOPs per token: {f.model / 1e9:,.2f} G (dense {f.dense / 1e9:,.2f} G, attention "
        f"{f.attention / 1e9:,.2f} G, CoPE table {f.cope_matmul / 1e9:,.3f} G; CoPE "
        f"elementwise {f.cope_elementwise / 1e9:,.3f} G, not counted in MFU)",
        "memory per GPU: " + ", ".join(f"{k} {_gib(v)}" for k, v in est.memory.items())
        + f" = {est.total_gib:.1f} GiB",
        f"activations by recomputation: {acts}",
        f"training: {tokens / 1e9:,.2f} B tokens, about {hours:,.1f} h at {mfu:.0%} MFU of "
        f"{peak_tflops:.0f} TFLOP/s per GPU",
    ]
    if fit:
        lines.append(fit_line(est))
    return "\n".join(lines)


def fit_line(est: Estimate) -> str:
    """Whether the run fits its GPUs, and if not, the smallest change that makes it fit."""
    budget = (f"{est.gpu_memory_gib - RESERVED_GIB:.0f} GiB usable on "
              f"{est.gpu_memory_gib:.0f} GiB GPUs")
    if est.fits:
        return f"fits: yes, {est.total_gib:.1f} GiB of {budget}"
    change = smallest_fitting_change(est)
    fix = (f"smallest change that fits: {change[0]} ({change[1].total_gib:.1f} GiB)" if change
           else "no change of ZeRO stage, recomputation, micro batch, TP or CP (up to 3 at "
           "once) fits: use more GPUs or larger ones")
    return f"fits: NO, {est.total_gib:.1f} GiB > {budget}; {fix}"
