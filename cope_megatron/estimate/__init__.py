"""Will a run fit, and what will it cost: parameters, FLOPs per token and memory per GPU,
from a config alone, before any node is booked.

Written here because the model is ours (Megatron-Core's local GPT layer with a PE's core
attention) and DeepSpeed's estimators (``estimate_zero*_model_states_mem_needs``) count
model states only: activations depend on what our layers save for backward.

One module a part: ``parameters``, ``memory`` and ``flops``; this one puts them together,
finds the smallest change that makes a run fit and writes the summary.

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

from cope_megatron.config import Config, Layout, padded_vocab_size
from cope_megatron.estimate.flops import PEAK_TFLOPS, FlopsPerToken, flops_per_token
from cope_megatron.estimate.memory import (
    GIB,
    RECOMPUTE_MODES,
    RESERVED_GIB,
    activation_bytes,
    model_state_bytes,
)
from cope_megatron.estimate.parameters import parameters
from cope_megatron.model import fusions
from cope_megatron.pe import ModelPE

REFERENCE_GPU_GIB = 80.0
REFERENCE_PEAK_TFLOPS = PEAK_TFLOPS["H100"]
"""What an estimate assumes without a GPU to ask: an 80 GiB H100 (dense bf16 peak)."""


@dataclass(frozen=True)
class Estimate:
    cfg: Config
    pe: ModelPE
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


def estimate(cfg: Config, pe: ModelPE, gpus: int, gpu_memory_gib: float | None = None,
             *, vocab_size: int | None = None, device: str = "cuda") -> Estimate:
    """The estimate for ``cfg`` with ``pe`` (``cfg.model.pe`` resolved) on ``gpus`` GPUs
    of ``gpu_memory_gib`` each (None: ``REFERENCE_GPU_GIB``); the vocabulary defaults to
    ``data.vocab_size``."""
    if gpu_memory_gib is None:
        gpu_memory_gib = REFERENCE_GPU_GIB
    layout = Layout.of(cfg, gpus)
    vocab = vocab_size or cfg.data.vocab_size
    per_rank = parameters(cfg, pe, vocab, layout.tensor)
    acts = {mode: sum(activation_bytes(cfg, pe, layout, mode, vocab_size=vocab,
                                       device=device).values())
            for mode in RECOMPUTE_MODES}
    memory = {**model_state_bytes(cfg, per_rank, layout),
              "activations": acts[cfg.train.recompute]}
    return Estimate(cfg=cfg, pe=pe, layout=layout, params=parameters(cfg, pe, vocab),
                    params_per_rank=per_rank,
                    flops=flops_per_token(cfg, pe, padded_vocab_size(vocab, 1)), memory=memory,
                    activations=acts, gpu_memory_gib=gpu_memory_gib, vocab_size=vocab,
                    device=device)


def _changes(cfg: Config, gpus: int, device: str) -> list[tuple[str, Config]]:
    """Single changes that lower memory per GPU, cheapest in throughput first."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    out = []

    def changed(section: str, **values) -> Config:
        return dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})

    if cfg.zero.stage < 3 and Layout.of(cfg, gpus).replicas > 1:
        stage = cfg.zero.stage + 1
        out.append((f"zero.stage={stage}", changed("zero", stage=stage)))
    if not fusions.enabled(cfg.fusion, "cross_entropy", device):  # recomputes one matmul
        out.append(("fusion.cross_entropy=chunked", changed("fusion", cross_entropy="chunked")))
    for mode in RECOMPUTE_MODES[RECOMPUTE_MODES.index(t.recompute) + 1:]:
        out.append((f"train.recompute={mode}", changed("train", recompute=mode)))
    if t.micro_batch_size > 1 and t.micro_batch_size % 2 == 0:
        out.append((f"train.micro_batch_size={t.micro_batch_size // 2} "
                    f"train.grad_accum={2 * t.grad_accum}",
                    changed("train", micro_batch_size=t.micro_batch_size // 2,
                            grad_accum=2 * t.grad_accum)))
    groups = m.query_groups
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
    gpus = est.layout.world
    frontier = [("", est.cfg)]
    for _ in range(max_changes):
        next_frontier = []
        for overrides, base in frontier:
            for change, new in _changes(base, gpus, est.device):
                done = f"{overrides} {change}".strip()
                result = estimate(new, est.pe, gpus, est.gpu_memory_gib, vocab_size=est.vocab_size,
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
    hours = tokens * f.model / (lay.world * peak_tflops * 1e12 * mfu) / 3600
    acts = ", ".join(f"{mode} {_gib(b)}" for mode, b in est.activations.items())
    lines = [
        f"model: {cfg.model.pe}, {est.params / 1e6:,.1f}M parameters, "
        f"{est.params_per_rank / 1e6:,.1f}M per tensor-parallel rank",
        f"layout: {lay.world} GPUs = TP {lay.tensor} x CP {lay.context} x DP {lay.data}, "
        f"ZeRO-{lay.zero_stage}, {t.precision}, micro batch {t.micro_batch_size} x "
        f"{cfg.model.seq_length} tokens, recompute {t.recompute}",
        f"FLOPs per token: {f.model / 1e9:,.2f} G (dense {f.dense / 1e9:,.2f} G, attention "
        f"{f.attention / 1e9:,.2f} G, CoPE table {f.cope_matmul / 1e9:,.3f} G; PE "
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
