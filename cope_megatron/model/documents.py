"""Document-aware attention (``data.document_boundaries``): in a packed sample, a token
attends only to earlier tokens of its own document, and positions restart at each document.

Prep ends every document with the tokenizer's end-of-document token (``data/prep``), so the
packed sample itself records where documents start: after each EOS, and at the sample's
first token (a document cut by the packing continues there). No format change, and a data
set prepared before this option existed works with it (Megatron-LM's
``--reset-attention-mask`` reads the same boundaries).

One tensor carries it everywhere: ``starts`` [b, S], for each token of the whole sample the
global index of its document's first token (under context parallelism every rank keeps the
whole sample's, a few bytes per token, since its keys come from every rank). From it:
- position ids restart, ``position − start`` (learned and sinusoidal tables read them,
  RoPE is gathered at them: ``DocumentAwareGPT``);
- core attention runs each document on its own (``model.attention``), or under context
  parallelism each chunk pair on the parts that stay inside one document
  (``ops.context_parallel.ring.document_parts``);
- every PE then sees what it would see on the document alone: distance biases their
  in-document distances, FIRE its in-document query position, CoPE's gate sums and
  stick-breaking's survival products stop at the boundary, FoX's decay never crosses it.
It reaches core attention as Megatron's ``attention_mask`` argument, which GPTModel passes
through every layer untouched (and activation recomputation saves as a tensor).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from cope_megatron.config import Config, ConfigError


def document_eos(cfg: Config, manifest: dict) -> int | None:
    """The token that ends a document when ``data.document_boundaries`` is on (the data
    set's EOS, from its manifest); None when attention may cross documents."""
    if not cfg.data.document_boundaries:
        return None
    if manifest.get("eos_id") is None:
        raise ConfigError(f"data.document_boundaries: the data set in {cfg.data.shards} "
                          "records no end-of-document token (a task's samples are one "
                          "example each); set data.document_boundaries=false")
    return manifest["eos_id"]


def document_starts(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[b, s]: for each input token, the index of its document's first token (the token
    after the latest EOS before it, or 0)."""
    s = inputs.shape[1]
    index = torch.arange(s, device=inputs.device).expand_as(inputs)
    begins = torch.zeros_like(inputs, dtype=torch.bool)
    begins[:, 0] = True
    begins[:, 1:] = inputs[:, :-1] == eos_id
    return torch.where(begins, index, 0).cummax(dim=1).values


class DocumentAwareGPT(GPTModel):
    """Megatron's GPTModel whose rotary embedding is read at the given position ids when
    documents restart them (GPTModel computes it for positions 0…S−1 only)."""

    document_eos: int | None = None
    """Set by ``model.gpt.build_gpt``: the token after which a document starts, when the
    model is fed document starts (``document_eos``)."""

    def _preprocess(self, *, position_ids, **kwargs):
        out = super()._preprocess(position_ids=position_ids, **kwargs)
        if self.document_eos is None or self.position_embedding_type not in ("rope", "yarn"):
            return out
        # The global table for positions 0…S−1 (``packed_seq`` skips Megatron's slicing to
        # this CP rank's chunks), gathered at each token's in-document position.
        length = position_ids.shape[1] * self.config.context_parallel_size
        table = self.rotary_pos_emb(length, packed_seq=True)
        if self.position_embedding_type == "yarn":
            table = table[0]
        rotary = table[:, 0, 0][position_ids].transpose(0, 1).unsqueeze(2)  # [s, b, 1, d]
        return (out[0], rotary, *out[2:])
