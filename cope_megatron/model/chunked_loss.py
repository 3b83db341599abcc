"""A GPT whose loss never holds the logits of the whole vocabulary for every token.

Megatron's loss runs the output layer on all tokens, then its vocab-parallel
cross-entropy, which keeps the fp32 softmax of every token for backward: at 8k tokens
and a 50k vocabulary, 1.6 GB a micro batch. Here both run on chunks of tokens under
activation checkpointing, so a chunk's logits live only while it is computed and again
while its backward runs. torch's own ``F.linear_cross_entropy`` chunks too, but over the
whole vocabulary on one process: it has no vocab-parallel (TP) form. Each chunk goes
through Megatron's output layer and loss unchanged, so TP, sequence parallelism and ZeRO-3's
parameter gathering (hooked on the output layer) work as in the unfused model.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from cope_megatron.model.documents import DocumentAwareGPT


class ChunkedLossGPT(DocumentAwareGPT):
    """GPTModel whose loss runs over chunks of ``chunk_tokens`` tokens (with sequence
    parallelism: tokens after the output layer's gather over TP ranks)."""

    def __init__(self, *args, chunk_tokens: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_tokens = chunk_tokens

    def _postprocess(self, hidden_states, labels, **kwargs):
        if (labels is None or kwargs.get("inference_context") is not None
                or self.config.mtp_num_layers is not None):
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else None)
        return self._chunked_loss(hidden_states, labels, weight)

    def _chunked_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                      weight: torch.Tensor | None) -> torch.Tensor:
        """Per-token losses [b, s] of final hidden states ``hidden`` [s', b, h] (s' = s, or
        this rank's share under sequence parallelism) and ``labels`` [b, s]."""
        ranks = self.pg_collection.tp.size() if self.output_layer.sequence_parallel else 1
        rows, batch = hidden.shape[:2]
        step = max(1, self.chunk_tokens // (batch * ranks))
        # Under sequence parallelism the output layer gathers a chunk's rows from every TP
        # rank, rank by rank: these are the positions its logits belong to.
        position = torch.arange(ranks * rows, device=labels.device).view(ranks, rows)
        losses, positions = [], []
        for start in range(0, rows, step):
            at = position[:, start:start + step].reshape(-1)
            # No randomness in the output layer and loss: no RNG state to restore.
            losses.append(checkpoint(self._chunk_loss, hidden[start:start + step],
                                     labels[:, at], weight, use_reentrant=False,
                                     preserve_rng_state=False))
            positions.append(at)
        return torch.cat(losses, dim=1)[:, torch.cat(positions).argsort()]

    def _chunk_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                    weight: torch.Tensor | None) -> torch.Tensor:
        logits, _ = self.output_layer(hidden, weight=weight, runtime_gather_output=False)
        return self.compute_language_model_loss(labels, logits)
