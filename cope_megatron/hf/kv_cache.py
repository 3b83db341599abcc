"""The exported model's key/value cache (``modeling_cope_megatron``, shipped beside it).

Generation without it recomputes the whole prefix for every token: quadratic work per
token at long context. With it, a new token's queries attend to the cached keys, and
every PE stays exact, because each one's row for a new query is a function of that
query and of earlier keys alone:
- RoPE (and its scalings): keys are cached rotated, at their absolute positions.
- ALiBi, T5, Kerple, FIRE: the bias row at the query's absolute position.
- CoPE: the gates of the new row run over all cached keys (their positions counted from
  this query), so the row is recomputed against every key: O(n) per token, exact.
- FoX: the log forget gates are cached; the row's bias is a difference of their prefix
  sums.
- Stick-breaking: the row over all cached keys, as CoPE's.
- length_scale: the query's factor ln(i + 1) at its own position i.
The one exception is RoPE's dynamic NTK scaling past its original length: the base
follows the current length, so every earlier position's keys (and, through them, every
later layer's input) change with each token. There the cache is dropped and the whole
sequence recomputed, as without a cache (``exact``).

``transformers``' own ``DynamicCache`` holds keys and values per layer; FoX also needs
its gates, so the model makes this subclass itself rather than take generate's.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class CopeMegatronCache(DynamicCache):
    """Per layer: keys after RoPE [b, groups, n, d], values, and FoX's log forget gates
    [b, heads, n]."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[int, torch.Tensor] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               log_f: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append the new tokens' ``k``, ``v`` (and ``log_f``) to ``layer``'s; all of them."""
        keys, values = self.update(k, v, layer)
        if log_f is not None:
            if layer in self.gates:
                log_f = torch.cat([self.gates[layer], log_f], dim=-1)
            self.gates[layer] = log_f
        return keys, values, log_f

    # What generate does to the keys and values (beam search, assisted decoding), the gates
    # follow: [b, heads, n] like the keys' [b, groups, n, d].
    def _gates_become(self, change) -> None:
        self.gates = {layer: change(g) for layer, g in self.gates.items()}

    def reset(self) -> None:
        super().reset()
        self.gates = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._gates_become(lambda g: g.index_select(0, beam_idx.to(g.device)))

    def crop(self, tokens_to_remove: int) -> None:
        # transformers passes minus the count (and once passed a final length): whatever it
        # means, the gates follow the keys the parent kept.
        super().crop(tokens_to_remove)
        self.gates = {layer: g[..., :self.get_seq_length(layer)]
                      for layer, g in self.gates.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._gates_become(lambda g: g.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._gates_become(lambda g: g[indices])


def exact(config, length: int) -> bool:
    """Whether cached keys still hold at a sequence of ``length`` tokens."""
    rotary = any("rope" in pe for pe in [config.pe, *(config.pe_schedule or [])])
    return not (rotary and config.rope_scaling_type == "dynamic"
                and length > config.rope_original_length)


def forward_cache(cache: CopeMegatronCache | None, use_cache: bool | None,
                  attention_mask: torch.Tensor | None) -> CopeMegatronCache | None:
    """The cache a forward extends (a new one for ``use_cache`` without one). Padding is
    refused: positions would count the pad tokens."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported (positions would count the "
                         "padding): generate one sequence, or equal lengths, at a time")
    return CopeMegatronCache() if use_cache and cache is None else cache


def generation_inputs(config, input_ids: torch.Tensor, cache: CopeMegatronCache | None,
                      use_cache: bool | None, attention_mask: torch.Tensor | None) -> dict:
    """``prepare_inputs_for_generation``: the tokens the cache has not seen and the cache
    (a new one to start, or where it no longer holds: ``exact``)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not use_cache:
        return inputs
    if cache is None or not exact(config, input_ids.shape[1]):
        cache = CopeMegatronCache()
    return {**inputs, "input_ids": input_ids[:, cache.get_seq_length():], "cache": cache,
            "use_cache": True}
