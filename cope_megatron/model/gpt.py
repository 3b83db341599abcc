"""Build Megatron-Core's GPTModel for a run config, and compute the LM loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from cope_megatron.config import Config, padded_vocab_size
from cope_megatron.model import fusions
from cope_megatron.model.chunked_loss import ChunkedLossGPT
from cope_megatron.model.documents import DocumentAwareGPT, document_starts
from cope_megatron.model.layer_spec import get_layer_spec
from cope_megatron.pe import ModelPE
from cope_megatron.pe.rope_scaling import gpt_position_embedding, rotary_embedding, set_yarn_fields

RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
}
"""``train.recompute`` -> Megatron-Core's recomputation settings."""


def transformer_config(cfg: Config) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    bf16 = cfg.train.precision == "bf16"
    return TransformerConfig(
        **RECOMPUTE[cfg.train.recompute],
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor,
        sequence_parallel=p.sequence,
        context_parallel_size=p.context,
        # Draw each full weight on the CPU and slice it: the same seed gives the same model
        # for every TP layout (the GPU path seeds each shard separately).
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Fusions that need Apex/TE or CUDA; the unfused paths compute the same function.
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )


def build_gpt(cfg: Config, pe: ModelPE, vocab_size: int,
              document_eos: int | None = None) -> GPTModel:
    """The GPT for ``cfg`` with ``pe`` (``cfg.model.pe`` resolved) on the current device;
    call after ``init_distributed``; with the fusions ``cfg.fusion`` turns on there.
    ``document_eos``: attention stays within documents, which end with this token
    (``model.documents.document_eos``)."""
    device = fusions.device_type()
    chunked = fusions.enabled(cfg.fusion, "cross_entropy", device)
    model_cls = ChunkedLossGPT if chunked else DocumentAwareGPT
    extra = {"chunk_tokens": cfg.fusion.chunk_tokens} if chunked else {}
    config = transformer_config(cfg)
    position_embedding = gpt_position_embedding(cfg, pe)
    if position_embedding == "yarn":
        set_yarn_fields(config, cfg)
    model = model_cls(
        **extra,
        config=config,
        transformer_layer_spec=get_layer_spec(cfg, pe),
        vocab_size=padded_vocab_size(vocab_size, cfg.parallel.tensor),
        max_sequence_length=cfg.model.seq_length,
        position_embedding_type=position_embedding,
        rotary_base=int(cfg.pe.rope.base),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
    )
    if pe.rotary:  # partial, p-RoPE and scaled frequencies (``pe.rope_scaling``)
        model.rotary_pos_emb = rotary_embedding(cfg)
    if pe.position_embedding is not None:
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        model.embedding.position_embeddings = pe.position_embedding(cfg.model.hidden_size, dtype)
    model.max_positions = None if pe.extrapolates else cfg.model.seq_length
    model.document_eos = document_eos
    if fusions.enabled(cfg.fusion, "layers", device):
        fusions.compile_layers(model)
    return model


class BeyondTrainingLengthError(ValueError):
    """The PE has no representation for positions past its training length."""


def shifted_batch(tokens: torch.Tensor, eos_id: int | None = None,
                  **extra: torch.Tensor | None) -> dict:
    """Inputs, global position ids, next-token labels (and ``extra`` [b, s] tensors) of
    packed samples ``tokens`` [b, s + 1]: [b, s] each, or this rank's [b, s / CP] under
    context parallelism (Megatron's head-tail split, after the shift, so position ids stay
    global); and ``starts``: with ``eos_id``, each input token's document start [b, s] over
    the whole sample on every rank (``model.documents``), else None."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1], device=tokens.device).expand_as(inputs)
    batch = get_batch_on_this_cp_rank(  # a no-op without CP
        {"input_ids": inputs, "position_ids": position_ids, "labels": labels, **extra})
    batch["starts"] = None if eos_id is None else document_starts(inputs, eos_id)
    return batch


def model_batch(model: torch.nn.Module, tokens: torch.Tensor, **extra) -> dict:
    """``shifted_batch`` for ``model``: with document starts when it was built with them."""
    return shifted_batch(tokens, document_eos_of(model), **extra)


def run_model(model: torch.nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """``model`` on a ``shifted_batch``: position ids restart at document starts, which
    reach core attention as Megatron's attention mask argument."""
    positions, starts = batch["position_ids"], batch["starts"]
    if starts is not None:
        positions = positions - starts.gather(1, positions)
    return model(batch["input_ids"], positions, starts, **kwargs)


def token_losses(model: torch.nn.Module, tokens: torch.Tensor,
                 loss_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token cross-entropy of packed samples ``tokens`` [b, s + 1] per position, and
    ``loss_mask`` [b, s] cut the same way (see ``shifted_batch``)."""
    seq = tokens.shape[1] - 1
    limit = max_positions(model)
    if limit is not None and seq > limit:
        raise BeyondTrainingLengthError(
            f"sequence length {seq} exceeds the {limit} positions this position encoding was "
            "trained with (learned absolute embeddings cannot extrapolate)"
        )
    batch = model_batch(model, tokens, loss_mask=loss_mask)
    per_token = run_model(model, batch, labels=batch["labels"])
    return per_token.float(), batch["loss_mask"]


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of packed samples ``tokens`` [b, s + 1].

    Under context parallelism, the mean over this rank's tokens. CP ranks hold equally
    many, so the mean of these over the CP group is the sequence mean, and DeepSpeed's
    gradient average over DP × CP is that mean's gradient.
    """
    return token_losses(model, tokens)[0].mean()


def loss_sum(model: torch.nn.Module, tokens: torch.Tensor,
             loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ of next-token cross-entropy over this rank's predictions that ``loss_mask`` [b, s]
    keeps (all when None); the caller divides by the count over the whole batch."""
    losses, mask = token_losses(model, tokens, loss_mask)
    return losses.sum() if mask is None else (losses * mask).sum()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's PE can represent; None when unbounded."""
    return _built_with(model, "max_positions")


def document_eos_of(model: torch.nn.Module) -> int | None:
    """The end-of-document token of a model built with document boundaries, else None."""
    return _built_with(model, "document_eos")


def _built_with(model: torch.nn.Module, fact: str):
    """A fact ``build_gpt`` set on the GPT, through a DeepSpeed engine's ``module``."""
    return getattr(getattr(model, "module", model), fact, None)
