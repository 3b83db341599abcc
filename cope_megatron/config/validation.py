"""Cross-field checks of a loaded configuration, run before any process group or model
exists, and the values derived from it."""

from __future__ import annotations

import math
from pathlib import Path

from cope_megatron.config.resume_keys import check_allowed_changes
from cope_megatron.config.schema import Config, ConfigError


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Pad to a multiple of lcm(128, TP): fast matmuls, and the same padded size (hence
    the same initialization) for every TP that divides 128."""
    multiple = math.lcm(128, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError for a setting that cannot run, before anything is built. What a PE
    needs is checked by its registry entry (``cope_megatron.startup.check`` calls both)."""
    m, p = cfg.model, cfg.parallel

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")

    for key, value in [
        ("parallel.tensor", p.tensor),
        ("parallel.context", p.context),
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.seq_length", m.seq_length),
        ("train.steps", cfg.train.steps),
        ("train.micro_batch_size", cfg.train.micro_batch_size),
        ("train.grad_accum", cfg.train.grad_accum),
        ("data.vocab_size", cfg.data.vocab_size),
        ("data.max_line_chars", cfg.data.max_line_chars),
    ]:
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    if m.hidden_size % m.num_attention_heads:
        fail("model.hidden_size", f"{m.hidden_size} is not divisible by "
             f"model.num_attention_heads={m.num_attention_heads}")
    groups = m.query_groups
    if m.num_attention_heads % groups:
        fail("model.num_query_groups", f"{groups} must divide num_attention_heads="
             f"{m.num_attention_heads}")
    if m.num_attention_heads % p.tensor or groups % p.tensor:
        fail("parallel.tensor", f"{p.tensor} must divide the number of attention heads "
             f"({m.num_attention_heads}) and key/value groups ({groups}); pick a divisor")
    if p.sequence and p.tensor == 1:
        fail("parallel.sequence", "sequence parallelism needs parallel.tensor > 1; "
             "set parallel.sequence=false or raise parallel.tensor")
    if m.seq_length % (2 * p.context):
        fail("model.seq_length", f"{m.seq_length} must be divisible by 2 × parallel.context "
             f"= {2 * p.context} (context parallelism splits it into 2·CP chunks)")
    if p.sequence and (m.seq_length // p.context) % p.tensor:
        fail("parallel.sequence", f"each context-parallel rank's {m.seq_length // p.context} "
             f"tokens must split evenly over parallel.tensor={p.tensor} ranks; change "
             "model.seq_length or parallel.tensor")
    if p.context > 1 and m.attention_dropout > 0:
        fail("parallel.context", "attention dropout is not supported under context "
             "parallelism; set model.attention_dropout=0 or parallel.context=1")
    if world_size % (p.tensor * p.context):
        fail("parallel.tensor", f"world size {world_size} is not a multiple of "
             f"parallel.tensor × parallel.context = {p.tensor * p.context}; launch a multiple "
             f"of that many processes")
    if cfg.zero.stage not in (0, 1, 2, 3):
        fail("zero.stage", f"must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    if not 0 <= cfg.data.val_fraction < 1:
        fail("data.val_fraction", f"must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer).is_file():
        fail("data.tokenizer", f"file {cfg.data.tokenizer!r} does not exist; point it at a "
             "SentencePiece .model or leave it unset to train one")
    if not cfg.eval.length_multipliers or min(cfg.eval.length_multipliers) < 1:
        fail("eval.length_multipliers", "give a non-empty list of integers >= 1")
    stride = cfg.eval.stride
    if stride is not None and (stride < 1 or m.seq_length % stride):
        fail("eval.stride", f"{stride} must be a positive divisor of model.seq_length="
             f"{m.seq_length} (or unset for the training length)")
    t = cfg.train
    if not t.lr > 0:
        fail("train.lr", f"must be positive, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        fail("train.min_lr", f"must be in [0, train.lr={t.lr}] (the schedule decays from lr "
             f"to min_lr), got {t.min_lr}")
    for key, value in [("train.keep_checkpoints", cfg.train.keep_checkpoints),
                       ("train.warmup_steps", cfg.train.warmup_steps),
                       ("train.max_bad_steps", cfg.train.max_bad_steps),
                       ("train.save_interval_minutes", cfg.train.save_interval_minutes),
                       ("eval.interval", cfg.eval.interval)]:
        if value < 0:
            fail(key, f"must be 0 (off) or more, got {value}")
    for key, value in [("eval.tokens", cfg.eval.tokens), ("eval.batch_size", cfg.eval.batch_size)]:
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    if cfg.eval.passkey_samples < 0:
        fail("eval.passkey_samples", f"must be 0 (off) or more, got {cfg.eval.passkey_samples}")
    if cfg.data.streams is not None and cfg.data.streams < 1:
        fail("data.streams", f"must be at least 1 (or unset), got {cfg.data.streams}")
    if cfg.task.variables not in range(1, 6):
        fail("task.variables", f"counting programs use 1 to 5 variables, got "
             f"{cfg.task.variables}")
    for key, value in [("task.train_samples", cfg.task.train_samples),
                       ("task.test_samples", cfg.task.test_samples)]:
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    if not all(0 <= d <= 1 for d in cfg.eval.passkey_depths):
        fail("eval.passkey_depths", "depths are fractions in [0, 1]")
    check_allowed_changes(cfg.run.allow_config_change)

