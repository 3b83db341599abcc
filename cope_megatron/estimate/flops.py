"""Model FLOPs per trained token and achieved-throughput figures (tokens/s, TFLOP/s, MFU).

Counted by hand from the config because no library counts CoPE: FLOP counters (torch's
``FlopCounterMode``) see only the matmuls the op happens to run, and Megatron's own
formula (``num_floating_point_operations``) lives in its training script, not in core.

Training does 3 forwards' worth of work (forward, and backward through inputs and
weights). Per token, one forward is:
- dense: 2 FLOPs per weight of every matmul (QKV, projection, MLP, logits);
- attention: causal scores q·k and the weighted sum of v, 2·d FLOPs per visible key and
  head for each, (s + 1)/2 keys on average: what a causal FlashAttention kernel computes;
- CoPE's extra work, reported apart: the position-logit matmul z = q·E (2·d·npos per head),
  and per visible key a handful of elementwise operations (sigmoid, cumulative sum,
  gather, interpolation) that run off the tensor cores; other PEs' elementwise work per
  key (``PositionEncoding.elementwise_per_key``: FoX's bias, stick-breaking's log-space
  weights) is reported in the same place;
- a token gate (FoX) is one more projection, counted in dense.
MFU counts dense + attention (+ CoPE's matmul), so it compares PEs on the same footing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from cope_megatron.config import Config
from cope_megatron.pe import ModelPE

COPE_ELEMENTWISE_PER_KEY = 10
"""sigmoid, reverse cumsum, clamp, floor, two gathers, interpolation, the added bias."""

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks per device name (datasheets, without sparsity)."""


@dataclass(frozen=True)
class FlopsPerToken:
    dense: float
    attention: float
    cope_matmul: float
    cope_elementwise: float

    @property
    def model(self) -> float:
        """What MFU counts: matmul work, CoPE's table product included."""
        return self.dense + self.attention + self.cope_matmul

    def as_dict(self) -> dict:
        return {**asdict(self), "model": self.model}


def matmul_weights(cfg: Config, vocab_size: int, gate_layers: int = 0) -> int:
    """Weights that multiply activations per token: every linear layer and the logits,
    and the token-gate projection of ``gate_layers`` layers (FoX)."""
    m = cfg.model
    qkv = m.hidden_size * (m.num_attention_heads + 2 * m.query_groups) * m.head_dim
    gate = gate_layers * m.hidden_size * m.num_attention_heads
    proj = m.num_attention_heads * m.head_dim * m.hidden_size
    mlp = 2 * m.hidden_size * m.ffn_size
    return m.num_layers * (qkv + proj + mlp) + gate + vocab_size * m.hidden_size


def flops_per_token(cfg: Config, pe: ModelPE, vocab_size: int,
                    seq_length: int | None = None) -> FlopsPerToken:
    """Training FLOPs per token (module docstring) with ``pe`` (``cfg.model.pe``
    resolved); ``vocab_size`` as padded for the model, ``seq_length`` defaulting to the
    config's."""
    m = cfg.model
    s = seq_length or m.seq_length
    head_dim = m.head_dim
    per_head_key = 2 * 2 * head_dim  # q·k and p·v, one multiply-add each per dimension
    visible = (s + 1) / 2
    attention = m.num_layers * m.num_attention_heads * per_head_key * visible
    npos = cfg.pe.cope.npos_max
    layers = pe.per_layer(m.num_layers)
    cope_layers = sum(layer.uses_cope_op for layer in layers)
    cope_matmul = cope_layers * m.num_attention_heads * 2 * head_dim * npos
    per_key = sum(COPE_ELEMENTWISE_PER_KEY if layer.uses_cope_op else layer.elementwise_per_key
                  for layer in layers)
    elementwise = m.num_attention_heads * per_key * visible
    gate_layers = sum(layer.token_gate for layer in layers)
    return FlopsPerToken(dense=3 * 2 * matmul_weights(cfg, vocab_size, gate_layers),
                         attention=3 * attention, cope_matmul=3 * cope_matmul,
                         cope_elementwise=3 * elementwise)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak per GPU (``override`` wins); None when unknown (CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def throughput(tokens: int, seconds: float, flops: FlopsPerToken, devices: int,
               peak: float | None) -> dict:
    """tokens/s, achieved TFLOP/s per device and MFU (None without a known peak)."""
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops.model / devices / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None}
