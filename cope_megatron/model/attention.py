"""Megatron core-attention adapter: Megatron's [s, b, heads, d] layout in, a PE's
attention on [b, heads, s, d], and [s, b, heads·d] out.

Every PE goes through this one module, so layout conversions live in one place. Under
context parallelism the tensors hold this rank's two sequence chunks (head and tail) and
the PE's attention gets the CP group to exchange keys and values over. A length-scaled
softmax (``pe.length_scale``) scales the queries here, at their global positions (within
their document, with ``model.documents``' boundaries), so it composes with every PE.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from cope_megatron.config import PEConfig
from cope_megatron.ops.context_parallel.ring import ContextParallel, Documents
from cope_megatron.pe.base import AttentionShape, PositionEncoding
from cope_megatron.pe.length_scale import LengthScale


class PECoreAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        *,
        pe: PositionEncoding,
        pe_options: PEConfig,
        train_length: int,
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.sequence_parallel = config.sequence_parallel
        self.dropout = config.attention_dropout
        shape = AttentionShape.of_rank(
            total_heads=config.num_attention_heads, total_kv_heads=config.num_query_groups,
            head_dim=config.kv_channels, tp_size=tp_size,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            softmax_scale=softmax_scale, dropout=config.attention_dropout,
            init_std=config.init_method_std)
        self.attention = pe.attention(shape, pe_options)
        self.length_scale = (LengthScale(shape, pe_options.length_scale, train_length)
                             if pe_options.length_scale.type != "none" else None)
        self.token_gate = pe.token_gate
        # Megatron hands its CP group to core attention; the PE runs it over the ring.
        cp_group = (pg_collection.cp if pg_collection is not None
                    else parallel_state.get_context_parallel_group())
        self.cp = ContextParallel(cp_group) if config.context_parallel_size > 1 else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or (attention_bias is not None) != self.token_gate:
            raise ValueError("PECoreAttention supports neither packed sequences nor external "
                             "bias (only a token-gate PE's gate logits, from "
                             "model.token_gate)")
        # [s, b, h, d] -> [b, h, s, d]; gate logits [s, b, h] -> [b, h, s]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gate = attention_bias.permute(1, 2, 0) if self.token_gate else None
        starts = attention_mask  # document starts [b, S] (``model.documents``) or None
        if starts is not None and (starts.dim() != 2 or starts.is_floating_point()
                                   or starts.dtype == torch.bool):
            raise ValueError("PECoreAttention reads attention_mask as document starts, an "
                             f"integer [b, S] tensor; got {starts.dtype} {tuple(starts.shape)}")
        if starts is not None and self.cp is None:
            out = self._per_document(q, k, v, gate, starts)
        else:
            positions = self._positions(q.shape[2], q.device)
            if starts is not None:
                positions = positions - starts[:, positions]
            out = self._attend(q, k, v, gate, positions, starts)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _attend(self, q, k, v, gate, positions: torch.Tensor,
                starts: torch.Tensor | None = None) -> torch.Tensor:
        """The PE's attention on [b, h, s, d] at ``positions`` (for the length scale)."""
        if self.length_scale is not None:
            q = self.length_scale(q, positions)
        extra = {"gate": gate} if self.token_gate else {}
        if starts is not None:
            extra["starts"] = starts
        if self.training and self.dropout > 0 and not self.sequence_parallel:
            # Heads differ per TP rank, so dropout draws from the TP-rank stream (as
            # Megatron's DotProductAttention does).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.attention(q, k, v, self.cp, **extra)
        return self.attention(q, k, v, self.cp, **extra)

    def _per_document(self, q, k, v, gate, starts: torch.Tensor) -> torch.Tensor:
        """One process with document boundaries: each document of each sample on its own,
        as the varlen attention kernels do; exact for every PE, whatever its op."""
        rows, docs = [], Documents.of(starts)
        for i in range(q.shape[0]):
            parts = []
            for a, e in docs.ranges(i):
                one = (slice(i, i + 1), slice(None), slice(a, e))
                parts.append(self._attend(
                    q[one], k[one], v[one], None if gate is None else gate[one],
                    torch.arange(e - a, device=q.device)))
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)

    def _positions(self, s: int, device: torch.device) -> torch.Tensor:
        """Global positions of this rank's ``s`` tokens (under CP: its two chunks)."""
        if self.cp is None:
            return torch.arange(s, device=device)
        return torch.cat([self.cp.positions(chunk, s // 2, device)
                          for chunk in self.cp.chunks(self.cp.rank)])
