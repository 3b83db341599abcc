"""cope-megatron's GPT as a Hugging Face ``transformers`` model, in plain PyTorch, for
models exported by ``cope-megatron export`` (loaded with ``trust_remote_code=True``).

No standard architecture computes our function for every PE (Megatron's grouped QKV
layout, CoPE, T5 buckets on a decoder, ALiBi with GPT-2's biases and LayerNorm, FoX's
forget gate, stick-breaking), so this file implements the block once and each PE beside
it. It is copied next to the weights and needs only torch and transformers; CoPE, FoX and
stick-breaking run ``cope_megatron.ops``' memory-efficient ops when that package is
installed (memory linear in the length), and the same math plainly otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class CopeMegatronConfig(PretrainedConfig):
    model_type = "cope_megatron"

    def __init__(self, vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 intermediate_size: int | None = None, normalization: str = "LayerNorm",
                 pe: str = "rope", max_position_embeddings: int = 128,
                 rope_theta: float = 10000.0, cope_npos_max: int = 64,
                 cope_shared_table: bool = True, t5_num_buckets: int = 32,
                 t5_max_distance: int = 128, tie_word_embeddings: bool = True,
                 **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.normalization = normalization
        self.pe = pe
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.cope_npos_max = cope_npos_max
        self.cope_shared_table = cope_shared_table
        self.t5_num_buckets = t5_num_buckets
        self.t5_max_distance = t5_max_distance
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# -- position encodings -------------------------------------------------------------------


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


def sinusoidal_positions(positions: torch.Tensor, hidden: int) -> torch.Tensor:
    dims = torch.arange(0, hidden, 2, device=positions.device)
    angles = positions[..., None].float() * torch.exp(-math.log(10000.0) * dims / hidden)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :hidden]


def apply_rope(t: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of [b, h, s, d] at positions 0..s−1 (halves rotated, not pairs)."""
    d, s = t.shape[-1], t.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=t.device).float() / d)
    angles = torch.arange(s, device=t.device).float()[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    x1, x2 = t.chunk(2, dim=-1)
    return t * angles.cos().to(t.dtype) + torch.cat([-x2, x1], dim=-1) * angles.sin().to(t.dtype)


def cope_plain(q, k, v, table, npos_max: int, scale: float) -> torch.Tensor:
    """CoPE (Golovneva et al. 2024, Appendix B), materializing [b, h, s, s]."""
    s = q.shape[2]
    logits = scale * q @ k.transpose(-1, -2)
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    logits = logits.masked_fill(future, float("-inf"))
    pos = torch.sigmoid(logits).flip(-1).cumsum(-1).flip(-1).clamp(max=npos_max - 1)
    z = q @ table
    lo, frac = pos.floor(), pos - pos.floor()
    bias = frac * z.gather(-1, pos.ceil().long()) + (1 - frac) * z.gather(-1, lo.long())
    return torch.softmax(logits + bias, dim=-1) @ v


def cope(q, k, v, table, npos_max: int, scale: float) -> torch.Tensor:
    try:
        from cope_megatron.ops import cope_attention
    except ImportError:
        return cope_plain(q, k, v, table, npos_max, scale)
    return cope_attention(q, k, v, table, npos_max=npos_max, softmax_scale=scale)


def fox_plain(q, k, v, log_f, scale: float) -> torch.Tensor:
    """FoX (Lin et al. 2025): logits plus Σ_{l=j+1..i} log f_l = F_i − F_j, F the prefix
    sum of the log forget gates log_f [b, h, s]; materializing [b, h, s, s]."""
    s = q.shape[2]
    prefix = log_f.cumsum(-1)
    bias = prefix[..., :, None] - prefix[..., None, :]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(future, -math.inf),
                                          scale=scale)


def fox(q, k, v, log_f, scale: float) -> torch.Tensor:
    try:
        from cope_megatron.ops.fox import fox_attention
    except ImportError:
        return fox_plain(q, k, v, log_f, scale)
    return fox_attention(q, k, v, log_f, softmax_scale=scale)


def stickbreaking_plain(q, k, v, scale: float) -> torch.Tensor:
    """Stick-breaking (Tan et al. 2025): key j < i gets β_ij Π_{j<t<i} (1 − β_it),
    β = σ(scale·q·k), the rest of the stick weights the query's own value; in log space,
    materializing [b, h, s, s]."""
    s = q.shape[2]
    z = scale * q @ k.transpose(-1, -2)
    earlier = torch.ones(s, s, dtype=torch.bool, device=q.device).tril(-1)
    log_survive = F.logsigmoid(-z).masked_fill(~earlier, 0.0)
    after = log_survive.flip(-1).cumsum(-1).flip(-1) - log_survive  # Σ_{j<t<i}
    weights = torch.exp(F.logsigmoid(z) + after).masked_fill(~earlier, 0.0)
    return weights @ v + (1 - weights.sum(-1, keepdim=True)) * v


def stickbreaking(q, k, v, scale: float) -> torch.Tensor:
    try:
        from cope_megatron.ops.stickbreaking import stickbreaking_attention
    except ImportError:
        return stickbreaking_plain(q, k, v, scale)
    return stickbreaking_attention(q, k, v, softmax_scale=scale)


# -- the model ----------------------------------------------------------------------------


def _norm(config: CopeMegatronConfig) -> nn.Module:
    return (nn.RMSNorm if config.normalization == "RMSNorm" else nn.LayerNorm)(
        config.hidden_size, eps=1e-5)


class Attention(nn.Module):
    def __init__(self, config: CopeMegatronConfig) -> None:
        super().__init__()
        self.config = config
        self.heads, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        # Megatron's layout: per key/value group, its query heads, then its key and value.
        self.linear_qkv = nn.Linear(config.hidden_size,
                                    (self.heads + 2 * self.groups) * self.head_dim)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size)
        if config.pe in ("cope", "cope_rope"):
            rows = 1 if config.cope_shared_table else self.heads
            self.cope_table = nn.Parameter(torch.zeros(rows, self.head_dim, config.cope_npos_max))
        if config.pe == "t5":
            self.t5_bias = nn.Parameter(torch.zeros(self.heads, config.t5_num_buckets))
        if config.pe == "fox":  # the forget gate: one logit per head from the layer's input
            self.linear_gate = nn.Linear(config.hidden_size, self.heads)

    def distance_bias(self, s: int, device: torch.device) -> torch.Tensor | None:
        """[h, s, s] logit bias of ALiBi or T5, −∞ above the diagonal; None for neither."""
        distance = (torch.arange(s, device=device)[:, None]
                    - torch.arange(s, device=device)[None, :])
        c = self.config
        if c.pe == "alibi":
            bias = -alibi_slopes(self.heads).to(device)[:, None, None] * distance.clamp(min=0)
        elif c.pe == "t5":
            bias = self.t5_bias[:, t5_buckets(distance.clamp(min=0), c.t5_num_buckets,
                                              c.t5_max_distance)]
        else:
            return None
        return bias.masked_fill(distance < 0, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = (qkv[:, :, :, i].transpose(1, 2) for i in (per_group, per_group + 1))
        if self.config.pe in ("rope", "cope_rope"):
            q, k = apply_rope(q, self.config.rope_theta), apply_rope(k, self.config.rope_theta)
        k, v = (t.repeat_interleave(per_group, dim=1) for t in (k, v))
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.config.pe in ("cope", "cope_rope"):
            out = cope(q, k, v, self.cope_table, self.config.cope_npos_max, scale)
        elif self.config.pe == "fox":
            log_f = F.logsigmoid(self.linear_gate(x).float()).transpose(1, 2)  # [b, h, s]
            out = fox(q, k, v, log_f.to(q.dtype), scale)
        elif self.config.pe == "stickbreaking":
            out = stickbreaking(q, k, v, scale)
        else:
            bias = self.distance_bias(s, x.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                is_causal=bias is None, scale=scale)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class Layer(nn.Module):
    def __init__(self, config: CopeMegatronConfig) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = Attention(config)
        self.pre_mlp_layernorm = _norm(config)
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x))
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
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = _norm(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        """Every call sees the whole sequence (no key/value cache): CoPE's positions of
        earlier keys change with each new query, so a cache would hold only k and v."""
        s = input_ids.shape[1]
        positions = torch.arange(s, device=input_ids.device)
        x = self.word_embeddings(input_ids)
        if self.config.pe == "learned":
            if s > self.config.max_position_embeddings:
                raise ValueError(f"{s} tokens exceed the {self.config.max_position_embeddings} "
                                 "positions of the learned table")
            x = x + self.position_embeddings(positions)
        elif self.config.pe == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.config.hidden_size).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        logits = self.output_layer(self.final_layernorm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}
