"""Megatron's self-attention with one more output per head: a logit per head and token
computed from the layer's input x, for a PE whose attention needs it (``token_gate``:
FoX's forget gate f_t = σ(w_h·x_t + b_h), as in the paper's basic "FoX (LLaMA)" block,
without the "Pro" block's extras).

Core attention sees only q, k and v, so the gate cannot live there. The projection is a
ColumnParallelLinear beside Megatron's QKV projection: under TP each rank holds its own
heads' rows (its output is this rank's heads, as q's), under SP it gathers the sequence
as the QKV projection does (one more all-gather of x; folding the gate into the QKV
weight as an extra column per head would save it but reorder Megatron's QKV layout, which
checkpoints, export and RoPE all read), and under CP it sees this rank's head and tail
chunks, like q. The logits [s, b, heads] reach the core attention through Megatron's own
``attention_bias`` argument, which ``SelfAttention.forward`` hands to it unchanged;
``model.attention.PECoreAttention`` passes them to the PE as ``gate``. Megatron's selective
recomputation (``train.recompute=selective``) checkpoints the core attention with q, k, v
as its inputs and the bias taken from the enclosing scope, which would backpropagate the
gate's gradient through the layer's graph a second time; here the logits are one of the
checkpoint's inputs instead. Weight drawn like
Megatron's other projections; the bias starts at zero (σ(0) = ½), as the authors' model
initializes biases.
"""

from __future__ import annotations

from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention


class TokenGateSelfAttention(SelfAttention):
    def __init__(self, config, submodules, layer_number, *args, **kwargs) -> None:
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.linear_gate = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, config.num_attention_heads, config=config,
            init_method=config.init_method, bias=True, gather_output=False,
            skip_bias_add=False, tp_group=self.pg_collection.tp)

    def forward(self, hidden_states, attention_mask, *args, attention_bias=None, **kwargs):
        if attention_bias is not None:
            raise ValueError("a token-gate attention takes no external attention_bias")
        gate, _ = self.linear_gate(hidden_states)  # [s, b, heads on this TP rank]
        return super().forward(hidden_states, attention_mask, *args, attention_bias=gate,
                               **kwargs)

    def _checkpointed_attention_forward(self, query, key, value, attention_mask,
                                        rotary_pos_emb=None, attn_mask_type=None,
                                        attention_bias=None, packed_seq_params=None):
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type

        def core(query, key, value, gate, attention_mask):
            return self.core_attention(query, key, value, attention_mask,
                                       attn_mask_type=mask_type, attention_bias=gate,
                                       packed_seq_params=packed_seq_params)

        return tensor_parallel.checkpoint(core, False, query, key, value, attention_bias,
                                          attention_mask)
