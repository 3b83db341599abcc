"""Which settings a resume may change: the one table of it.

A checkpoint records the config it was trained with and the identity of its data
(``training/resume.py``). On resume, a key marked ``REFUSED`` that differs stops the run
before anything is built or written: continuing would train a hybrid (another model,
other data, another data order) under one run's name. A key marked ``ALLOWED`` may
change: it takes effect from the resume step on and the change is logged. A key listed in
``run.allow_config_change`` is allowed although refused here (a deliberate change).

``EVAL_TIME`` names the keys that ``eval`` may change although a resume refuses them:
how a trained model is run beyond its length (RoPE scaling), not which model it is.

Besides the schema's keys, four facts that no single key holds are compared: the
tokenizer and the shard set the data was made of, a mixture's sources (each one's share
and shard set, in order), and the global batch (micro batch × accumulation ×
data-parallel size, which may be re-split but not changed).
"""

from __future__ import annotations

from typing import Literal

from cope_megatron.config.loading import flat_keys
from cope_megatron.config.schema import ConfigError

REFUSED = "refused"
ALLOWED = "allowed"

DERIVED_KEYS = ("data.tokenizer_sha256", "data.shards_fingerprint", "data.mixture_sources",
                "train.global_batch")
"""Facts of the run that are not schema keys, compared like keys."""

_TABLE: dict[str, str] = {
    # The model: its shape, its position encoding and that PE's options.
    "model.*": REFUSED,
    "pe.*": REFUSED,
    "pe.cope.impl": ALLOWED,  # an implementation of the same function
    "pe.bias_kernel": ALLOWED,  # the same attention on another kernel
    # pe.rope_scaling.* changes the function: refused on resume (``pe.*``; fine-tuning at
    # a longer length names it in run.allow_config_change), an evaluation's own choice.
    # The data and its order.
    "data.tokenizer_sha256": REFUSED,
    "data.shards_fingerprint": REFUSED,
    "data.mixture_sources": REFUSED,  # a changed weight, source or order of sources
    "train.global_batch": REFUSED,
    "data.streams": REFUSED,  # compared resolved (None: from the global batch)
    "data.shuffle_buffer": REFUSED,
    "train.seed": REFUSED,
    "train.precision": REFUSED,
    "data.document_boundaries": REFUSED,  # what attention sees: the function trained
    # Prep settings: what the data is is compared by its identity above, not by them.
    "data.corpus": ALLOWED, "data.cache_dir": ALLOWED, "data.shards": ALLOWED,
    "data.mixture": ALLOWED,  # where its sources lie and their names; compared above
    "data.tokenizer": ALLOWED, "data.tokenizer_type": ALLOWED, "data.vocab_size": ALLOWED,
    "data.byte_fallback": ALLOWED, "data.user_symbols": ALLOWED, "data.text_field": ALLOWED,
    "data.val_fraction": ALLOWED, "data.shard_max_bytes": ALLOWED,
    "data.prep_workers": ALLOWED, "data.tokenizer_sample_bytes": ALLOWED,
    "data.max_docs": ALLOWED, "data.decode_errors": ALLOWED, "data.max_line_chars": ALLOWED,
    "data.eos_token": ALLOWED, "data.pad_token": ALLOWED, "data.join_rows": ALLOWED,
    "data.join_rows_n": ALLOWED,
    "task.*": ALLOWED,
    # How the same data is read.
    "data.num_workers": ALLOWED, "data.on_error": ALLOWED, "data.verify": ALLOWED,
    # Where the same shards are read from (their identity is compared above).
    "data.url_prefix": ALLOWED, "data.url_suffix": ALLOWED, "data.url_retries": ALLOWED,
    "data.url_backoff_s": ALLOWED,
    # The optimizer and its schedule: applied from the resume step on.
    "train.lr": ALLOWED, "train.min_lr": ALLOWED, "train.warmup_steps": ALLOWED,
    "train.lr_decay": ALLOWED, "train.steps": ALLOWED, "train.weight_decay": ALLOWED,
    "train.beta1": ALLOWED, "train.beta2": ALLOWED, "train.grad_clip": ALLOWED,
    "train.max_bad_steps": ALLOWED,
    # The split of the global batch (train.global_batch is compared above).
    "train.micro_batch_size": ALLOWED, "train.grad_accum": ALLOWED,
    # Bookkeeping and speed.
    "train.recompute": ALLOWED, "train.peak_tflops": ALLOWED, "train.log_interval": ALLOWED,
    "train.save_interval": ALLOWED, "train.save_interval_minutes": ALLOWED,
    "train.keep_checkpoints": ALLOWED, "eval.*": ALLOWED, "logging.*": ALLOWED,
    "run.*": ALLOWED,
    # The parallel layout: checked against the checkpoint's layout.json, converted when
    # ZeRO states were partitioned for another data-parallel size.
    "parallel.*": ALLOWED, "zero.*": ALLOWED,
    # Fused kernels compute the same function to rounding.
    "fusion.*": ALLOWED,
}


EVAL_TIME = ("pe.rope_scaling.",)
"""Prefixes of the keys ``eval`` may change against the checkpoint it scores."""


def classify(key: str, unused: frozenset[str] = frozenset()) -> Literal["refused", "allowed"]:
    """``REFUSED`` or ``ALLOWED`` for a dotted key (the most specific entry wins); a
    ``pe.<section>`` in ``unused`` (options no PE of either run reads) changes nothing."""
    if key.startswith("pe.") and key.split(".")[1] in unused:
        return ALLOWED
    if key in _TABLE:
        return _TABLE[key]  # type: ignore[return-value]
    section = key.split(".", 1)[0] + ".*"
    if section in _TABLE:
        return _TABLE[section]  # type: ignore[return-value]
    raise KeyError(f"{key} is not classified in cope_megatron/config/resume_keys.py")


def check_allowed_changes(keys: list[str]) -> None:
    """``run.allow_config_change`` names keys a resume compares."""
    unknown = sorted(set(keys) - set(flat_keys()) - set(DERIVED_KEYS))
    if unknown:
        raise ConfigError(f"run.allow_config_change: {unknown} are not keys a resume compares; "
                          "give dotted keys such as model.pe or data.shards_fingerprint")
