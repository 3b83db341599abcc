"""cope-megatron's GPT as a Hugging Face ``transformers`` model, in plain PyTorch, for
models exported by ``cope-megatron export`` (loaded with ``trust_remote_code=True``).

No standard architecture computes our function for every PE (Megatron's grouped QKV
layout, CoPE, T5 buckets on a decoder, ALiBi with GPT-2's biases and LayerNorm, Kerple,
FIRE, FoX's forget gate, stick-breaking), so this file implements the block once and each
PE beside it. It is copied next to the weights with its key/value cache (``kv_cache.py``)
and needs only torch and transformers; CoPE, FoX and stick-breaking run
``cope_megatron.ops``' memory-efficient ops when that package is installed (memory linear
in the length), and the same math plainly otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kv_cache import CopeMegatronCache, forward_cache, generation_inputs


class CopeMegatronConfig(PretrainedConfig):
    model_type = "cope_megatron"

    def __init__(self, vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 intermediate_size: int | None = None, normalization: str = "LayerNorm",
                 pe: str = "rope", pe_schedule: list[str] | None = None,
                 max_position_embeddings: int = 128,
                 rope_theta: float = 10000.0, rope_percent: float = 1.0,
                 rope_keep_frequencies: float = 1.0, rope_scaling_type: str = "none",
                 rope_scaling_factor: float = 1.0, rope_original_length: int | None = None,
                 yarn_beta_fast: float = 32.0, yarn_beta_slow: float = 1.0,
                 yarn_mscale: float = 1.0, cope_npos_max: int = 64,
                 cope_shared_table: bool = True, t5_num_buckets: int = 32,
                 t5_max_distance: int = 128, fire_mlp_width: int = 32,
                 fire_threshold_init: float = 512.0, kerple_variant: str = "log",
                 kerple_max_exponent: float = 2.0, length_scale: str = "none",
                 length_scale_s: float = 1.0, tie_word_embeddings: bool = True,
                 **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.normalization = normalization
        self.pe = pe
        self.pe_schedule = pe_schedule or None
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_percent = rope_percent
        self.rope_keep_frequencies = rope_keep_frequencies
        self.rope_scaling_type = rope_scaling_type
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_original_length = rope_original_length or max_position_embeddings
        self.yarn_beta_fast = yarn_beta_fast
        self.yarn_beta_slow = yarn_beta_slow
        self.yarn_mscale = yarn_mscale
        self.cope_npos_max = cope_npos_max
        self.cope_shared_table = cope_shared_table
        self.t5_num_buckets = t5_num_buckets
        self.t5_max_distance = t5_max_distance
        self.fire_mlp_width = fire_mlp_width
        self.fire_threshold_init = fire_threshold_init
        self.kerple_variant = kerple_variant
        self.kerple_max_exponent = kerple_max_exponent
        self.length_scale = length_scale
        self.length_scale_s = length_scale_s
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_pe(self, layer: int) -> str:
        """Layer ``layer``'s PE: ``pe``, or its entry of the repeating ``pe_schedule``."""
        return self.pe_schedule[layer % len(self.pe_schedule)] if self.pe_schedule else self.pe


# -- position encodings -------------------------------------------------------------------
# Attention of m queries against n ≥ m keys: the queries are the last m positions (m < n
# when earlier keys come from ``kv_cache``).


def future_mask(m: int, n: int, device: torch.device) -> torch.Tensor:
    """[m, n] True where key j lies after query i (at position n − m + i)."""
    return torch.ones(m, n, dtype=torch.bool, device=device).triu(n - m + 1)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """2^(−8k/n) for n a power of two; else the nearest lower power's slopes followed by
    every other slope of the next one (Press et al.'s code)."""
    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(geometric(num_heads))
    lower = 2 ** math.floor(math.log2(num_heads))
    return torch.tensor(geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower])


def t5_buckets(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal T5 buckets: exact below num_buckets/2, logarithmic up to max_distance."""
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(distance.float().clamp(min=1) / exact)
                          / math.log(max_distance / exact) * (num_buckets - exact)).long()
    return torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


def kerple_bias(distance: torch.Tensor, r1_raw: torch.Tensor, r2_raw: torch.Tensor,
                variant: str, max_exponent: float) -> torch.Tensor:
    """Kerple (Chi et al. 2022): −r₁·log(1 + r₂·d) or −r₁·d^r₂ per head, r = softplus(ρ) +
    0.01 and the power exponent 0.01 + (max − 0.01)·sigmoid(ρ₂)."""
    r1 = (F.softplus(r1_raw) + 0.01)[:, None, None]
    d = distance.to(r1.dtype)
    if variant == "log":
        return -r1 * torch.log1p((F.softplus(r2_raw) + 0.01)[:, None, None] * d)
    r2 = (0.01 + (max_exponent - 0.01) * torch.sigmoid(r2_raw))[:, None, None]
    # d^r₂ taken at d ≥ 1: its derivative in r₂ at d = 0 would be 0·(−∞)
    return -r1 * torch.where(d > 0, d.clamp(min=1) ** r2, torch.zeros_like(d))


def fire_bias(rows: torch.Tensor, s: int, attn: nn.Module, threshold_init: float
              ) -> torch.Tensor:
    """FIRE (Li et al. 2023): f(ψ(i − j) / ψ(max(L, i))), ψ(x) = log(|c|·x + 1), L =
    |λ|·L₀, f a ReLU MLP from one input to every head; [h, rows, s] for query positions
    ``rows`` (valid for j ≤ i)."""
    pos = rows.to(attn.c.device, torch.float32)
    c, threshold = attn.c.float().abs(), (attn.threshold_scale.float() * threshold_init).abs()
    keys = torch.arange(s, device=attn.c.device, dtype=torch.float32)
    distance = (pos[:, None] - keys[None, :]).clamp(min=0)
    normalizer = torch.log1p(c * torch.maximum(pos, threshold)) + 1e-6
    x = torch.log1p(c * distance) / normalizer[:, None]
    hidden = torch.relu(x[..., None] * attn.mlp_in_weight.float() + attn.mlp_in_bias.float())
    return (hidden @ attn.mlp_out_weight.float().T + attn.mlp_out_bias.float()).permute(2, 0, 1)


def sinusoidal_positions(positions: torch.Tensor, hidden: int) -> torch.Tensor:
    dims = torch.arange(0, hidden, 2, device=positions.device)
    angles = positions[..., None].float() * torch.exp(-math.log(10000.0) * dims / hidden)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :hidden]


def rope_frequencies(c: CopeMegatronConfig, dim: int,
                     length: int) -> tuple[torch.Tensor, float, float]:
    """RoPE's inverse frequencies θ_i of ``dim`` rotated dimensions at a forward of
    ``length`` tokens, what positions are divided by, and the scale of q and k: plain
    (Su et al. 2021), scaled by ``rope_scaling_type`` (linear: Chen et al. 2023; ntk and
    dynamic: base b·s^(d/(d−2)), dynamic with s·L/L₀ − s + 1 for s; yarn: Peng et al.
    2023, the ramp between the dimensions turning beta_fast and beta_slow times over L₀,
    and q, k scaled by 0.1·mscale·ln s + 1), then p-RoPE's lowest frequencies zeroed."""
    base, kind, s = c.rope_theta, c.rope_scaling_type, c.rope_scaling_factor
    original = c.rope_original_length
    if kind == "ntk":
        base = base * s ** (dim / (dim - 2))
    if kind == "dynamic" and length > original:
        base = base * (s * length / original - (s - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    divide, qk_scale = (s if kind == "linear" else 1.0), 1.0
    if kind == "yarn" and s > 1:
        def turning(rotations: float) -> float:  # the dimension that turns so often
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(turning(c.yarn_beta_fast)), 0)
        high = min(math.ceil(turning(c.yarn_beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
        qk_scale = 0.1 * c.yarn_mscale * math.log(s) + 1
    inv_freq[int(c.rope_keep_frequencies * dim // 2):] = 0
    return inv_freq, divide, qk_scale


def apply_rope(t: torch.Tensor, c: CopeMegatronConfig, start: int = 0) -> torch.Tensor:
    """Rotary embedding of [b, h, s, d] at positions start..start+s−1 of a sequence that
    long: the first d·rope_percent dimensions, halves rotated (not pairs); the rest pass."""
    s, dim = t.shape[-2], int(t.shape[-1] * c.rope_percent)
    inv_freq, divide, qk_scale = rope_frequencies(c, dim, start + s)
    angles = (torch.arange(start, start + s).float() / divide)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1).to(t.device)
    cos, sin = (f(angles) * qk_scale for f in (torch.cos, torch.sin))
    rot, rest = t[..., :dim], t[..., dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rot = rot * cos.to(t.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(t.dtype)
    return torch.cat([rot, rest], dim=-1)


def cope_plain(q, k, v, table, npos_max: int, scale: float) -> torch.Tensor:
    """CoPE (Golovneva et al. 2024, Appendix B), materializing [b, h, m, n]."""
    logits = scale * q @ k.transpose(-1, -2)
    logits = logits.masked_fill(future_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    pos = torch.sigmoid(logits).flip(-1).cumsum(-1).flip(-1).clamp(max=npos_max - 1)
    z = q @ table
    lo, frac = pos.floor(), pos - pos.floor()
    bias = frac * z.gather(-1, pos.ceil().long()) + (1 - frac) * z.gather(-1, lo.long())
    return torch.softmax(logits + bias, dim=-1) @ v


def cope(q, k, v, table, npos_max: int, scale: float) -> torch.Tensor:
    try:
        from cope_megatron.ops import cope_attention
    except ImportError:
        cope_attention = None
    if cope_attention is None or q.shape[2] != k.shape[2]:  # the op: square only
        return cope_plain(q, k, v, table, npos_max, scale)
    return cope_attention(q, k, v, table, npos_max=npos_max, softmax_scale=scale)


def fox_plain(q, k, v, log_f, scale: float) -> torch.Tensor:
    """FoX (Lin et al. 2025): logits plus Σ_{l=j+1..i} log f_l = F_i − F_j, F the prefix
    sum of the log forget gates log_f [b, h, n] of every key; materializing [b, h, m, n]."""
    m, n = q.shape[2], k.shape[2]
    prefix = log_f.cumsum(-1)
    bias = prefix[..., n - m:, None] - prefix[..., None, :]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(future_mask(m, n, q.device), -math.inf), scale=scale)


def fox(q, k, v, log_f, scale: float) -> torch.Tensor:
    try:
        from cope_megatron.ops.fox import fox_attention
    except ImportError:
        fox_attention = None
    if fox_attention is None or q.shape[2] != k.shape[2]:
        return fox_plain(q, k, v, log_f, scale)
    return fox_attention(q, k, v, log_f, softmax_scale=scale)


def stickbreaking_plain(q, k, v, scale: float) -> torch.Tensor:
    """Stick-breaking (Tan et al. 2025): key j < i gets β_ij Π_{j<t<i} (1 − β_it),
    β = σ(scale·q·k), the rest of the stick weights the query's own value; in log space,
    materializing [b, h, m, n]."""
    m, n = q.shape[2], k.shape[2]
    z = scale * q @ k.transpose(-1, -2)
    earlier = torch.ones(m, n, dtype=torch.bool, device=q.device).tril(n - m - 1)
    log_survive = F.logsigmoid(-z).masked_fill(~earlier, 0.0)
    after = log_survive.flip(-1).cumsum(-1).flip(-1) - log_survive  # Σ_{j<t<i}
    weights = torch.exp(F.logsigmoid(z) + after).masked_fill(~earlier, 0.0)
    return weights @ v + (1 - weights.sum(-1, keepdim=True)) * v[..., n - m:, :]


def stickbreaking(q, k, v, scale: float) -> torch.Tensor:
    try:
        from cope_megatron.ops.stickbreaking import stickbreaking_attention
    except ImportError:
        stickbreaking_attention = None
    if stickbreaking_attention is None or q.shape[2] != k.shape[2]:
        return stickbreaking_plain(q, k, v, scale)
    return stickbreaking_attention(q, k, v, softmax_scale=scale)


# -- the model ----------------------------------------------------------------------------


def _norm(config: CopeMegatronConfig) -> nn.Module:
    return (nn.RMSNorm if config.normalization == "RMSNorm" else nn.LayerNorm)(
        config.hidden_size, eps=1e-5)


class Attention(nn.Module):
    def __init__(self, config: CopeMegatronConfig, pe: str) -> None:
        super().__init__()
        self.config, self.pe = config, pe
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        # Megatron's layout: per key/value group, its query heads, then its key and value.
        self.linear_qkv = nn.Linear(config.hidden_size,
                                    (self.heads + 2 * self.groups) * self.head_dim)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size)
        if pe in ("cope", "cope_rope"):
            rows = 1 if config.cope_shared_table else self.heads
            self.cope_table = nn.Parameter(torch.zeros(rows, self.head_dim, config.cope_npos_max))
        if pe == "t5":
            self.t5_bias = nn.Parameter(torch.zeros(self.heads, config.t5_num_buckets))
        if pe == "kerple":
            self.r1_raw = nn.Parameter(torch.zeros(self.heads))
            self.r2_raw = nn.Parameter(torch.zeros(self.heads))
        if pe == "fire":
            width = config.fire_mlp_width
            self.c = nn.Parameter(torch.zeros(1))
            self.threshold_scale = nn.Parameter(torch.ones(1))
            self.mlp_in_weight = nn.Parameter(torch.zeros(width))
            self.mlp_in_bias = nn.Parameter(torch.zeros(width))
            self.mlp_out_weight = nn.Parameter(torch.zeros(self.heads, width))
            self.mlp_out_bias = nn.Parameter(torch.zeros(self.heads))
        if pe == "fox":  # the forget gate: one logit per head from the layer's input
            self.linear_gate = nn.Linear(config.hidden_size, self.heads)
        if config.length_scale != "none":  # scaled queries: s_h · ln(i + 1) for row i
            s = torch.full((self.heads,), config.length_scale_s)
            if config.length_scale == "learned":
                self.length_scale = nn.Parameter(s)
            else:
                self.register_buffer("length_scale", s, persistent=False)

    def position_bias(self, rows: torch.Tensor, s: int) -> torch.Tensor | None:
        """[h, rows, s] logit bias of ALiBi, T5, Kerple or FIRE for queries at positions
        ``rows`` and keys 0..s−1, −∞ for later keys; None for none of them."""
        device = rows.device
        distance = rows[:, None] - torch.arange(s, device=device)[None, :]
        c = self.config
        if self.pe == "alibi":
            bias = -alibi_slopes(self.heads).to(device)[:, None, None] * distance.clamp(min=0)
        elif self.pe == "t5":
            bias = self.t5_bias[:, t5_buckets(distance.clamp(min=0), c.t5_num_buckets,
                                              c.t5_max_distance)]
        elif self.pe == "kerple":
            bias = kerple_bias(distance.clamp(min=0), self.r1_raw, self.r2_raw,
                               c.kerple_variant, c.kerple_max_exponent)
        elif self.pe == "fire":
            bias = fire_bias(rows, s, self, c.fire_threshold_init)
        else:
            return None
        return bias.masked_fill(distance < 0, float("-inf"))

    def forward(self, x: torch.Tensor, cache: CopeMegatronCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """``x``: the tokens after the ``cache``'s (if any), which gains their keys."""
        b, s, _ = x.shape
        start = 0 if cache is None else cache.get_seq_length(layer)
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = (qkv[:, :, :, i].transpose(1, 2) for i in (per_group, per_group + 1))
        if self.pe in ("rope", "cope_rope"):
            q, k = apply_rope(q, self.config, start), apply_rope(k, self.config, start)
        rows = torch.arange(start, start + s, device=x.device)
        if self.config.length_scale != "none":
            log_rows = torch.log1p(rows.float())
            q = q * (self.length_scale.float()[:, None] * log_rows)[:, :, None].to(q.dtype)
        log_f = None
        if self.pe == "fox":
            log_f = F.logsigmoid(self.linear_gate(x).float()).transpose(1, 2)  # [b, h, s]
        if cache is not None:
            k, v, log_f = cache.extend(layer, k, v, log_f)
        k, v = (t.repeat_interleave(per_group, dim=1) for t in (k, v))
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.pe in ("cope", "cope_rope"):
            out = cope(q, k, v, self.cope_table, self.config.cope_npos_max, scale)
        elif self.pe == "fox":
            out = fox(q, k, v, log_f.to(q.dtype), scale)
        elif self.pe == "stickbreaking":
            out = stickbreaking(q, k, v, scale)
        else:
            n = k.shape[2]
            bias = self.position_bias(rows, n)
            if bias is None and start:  # SDPA's is_causal aligns the top left
                bias = torch.zeros(s, n, device=x.device).masked_fill(
                    future_mask(s, n, x.device), -math.inf)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                is_causal=bias is None, scale=scale)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class Layer(nn.Module):
    def __init__(self, config: CopeMegatronConfig, pe: str) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = Attention(config, pe)
        self.pre_mlp_layernorm = _norm(config)
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cache: CopeMegatronCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cache, layer)
        return x + self.linear_fc2(F.gelu(self.linear_fc1(self.pre_mlp_layernorm(x))))


class CopeMegatronForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CopeMegatronConfig
    _tied_weights_keys = {"output_layer.weight": "word_embeddings.weight"}

    def __init__(self, config: CopeMegatronConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.pe == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                    config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, config.layer_pe(i))
                                    for i in range(config.num_hidden_layers))
        self.final_layernorm = _norm(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate's DynamicCache lacks FoX's gates: ``generation_inputs``

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: CopeMegatronCache | None = None, use_cache: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits of ``input_ids``, the tokens that follow ``cache``'s (``kv_cache``); with
        ``use_cache``, the cache (a new one if none) gains them."""
        cache = forward_cache(cache, use_cache, attention_mask)
        start = 0 if cache is None else cache.get_seq_length()
        s = input_ids.shape[1]
        positions = torch.arange(start, start + s, device=input_ids.device)
        x = self.word_embeddings(input_ids)
        if self.config.pe == "learned":
            if start + s > self.config.max_position_embeddings:
                raise ValueError(f"{start + s} tokens exceed the "
                                 f"{self.config.max_position_embeddings} positions of the "
                                 "learned table")
            x = x + self.position_embeddings(positions)
        elif self.config.pe == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.config.hidden_size).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        logits = self.output_layer(self.final_layernorm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      cache: CopeMegatronCache | None = None,
                                      use_cache: bool | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        return generation_inputs(self.config, input_ids, cache, use_cache, attention_mask)
