"""Cross-field checks of a loaded configuration, run before any process group or model
exists, and the values derived from it."""

from __future__ import annotations

import math
from pathlib import Path

from cope_megatron.config.resume_keys import check_allowed_changes
from cope_megatron.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ParallelConfig,
    RulerConfig,
    TaskConfig,
    TrainConfig,
)


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Pad to a multiple of lcm(128, TP): fast matmuls, and the same padded size (hence
    the same initialization) for every TP that divides 128."""
    multiple = math.lcm(128, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def _at_least(minimum: int, values: dict[str, float], off: bool = False) -> None:
    """Each ``key: value`` is at least ``minimum`` (``off``: 0 means off)."""
    for key, value in values.items():
        if value < minimum:
            _fail(key, f"must be {'0 (off) or more' if off else f'at least {minimum}'}, "
                  f"got {value}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError for a setting that cannot run, before anything is built, section by
    section. What a PE needs is checked by its registry entry (``cope_megatron.startup.check``
    calls both)."""
    _check_model(cfg.model, cfg.parallel, world_size)
    _check_train(cfg.train)
    _check_data(cfg.data)
    _check_eval(cfg.eval, cfg.model.seq_length)
    _check_task(cfg.task)
    if cfg.task.name is not None and cfg.data.mixture:
        _fail("data.mixture", f"a task run (task.name={cfg.task.name}) trains on its own "
              "generated data; mixtures are for language-model text")
    if cfg.task.name is not None and (cfg.eval.ruler.tasks or cfg.eval.position_loss):
        _fail("eval.ruler.tasks" if cfg.eval.ruler.tasks else "eval.position_loss",
              f"a task run (task.name={cfg.task.name}) is scored by its test splits; the "
              "long-context suite and loss against position need language-model text")
    if cfg.pe.bias_kernel == "flex" and cfg.model.attention_dropout > 0:
        _fail("pe.bias_kernel", "FlexAttention has no dropout; set model.attention_dropout=0 "
              "or pe.bias_kernel=materialized")
    if cfg.pe.length_scale.s is not None and cfg.pe.length_scale.s <= 0:
        _fail("pe.length_scale.s", f"must be > 0 (or unset for 1/ln(model.seq_length)), got "
              f"{cfg.pe.length_scale.s}")
    _at_least(1, {"fusion.chunk_tokens": cfg.fusion.chunk_tokens})
    if cfg.zero.stage not in (0, 1, 2, 3):
        _fail("zero.stage", f"must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    check_allowed_changes(cfg.run.allow_config_change)


def _check_model(m: ModelConfig, p: ParallelConfig, world_size: int) -> None:
    """The model's shape and how it splits over the parallel layout."""
    _at_least(1, {"parallel.tensor": p.tensor, "parallel.context": p.context,
                  "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
                  "model.num_attention_heads": m.num_attention_heads,
                  "model.seq_length": m.seq_length})
    if m.hidden_size % m.num_attention_heads:
        _fail("model.hidden_size", f"{m.hidden_size} is not divisible by "
              f"model.num_attention_heads={m.num_attention_heads}")
    groups = m.query_groups
    if m.num_attention_heads % groups:
        _fail("model.num_query_groups", f"{groups} must divide num_attention_heads="
              f"{m.num_attention_heads}")
    if m.num_attention_heads % p.tensor or groups % p.tensor:
        _fail("parallel.tensor", f"{p.tensor} must divide the number of attention heads "
              f"({m.num_attention_heads}) and key/value groups ({groups}); pick a divisor")
    if p.sequence and p.tensor == 1:
        _fail("parallel.sequence", "sequence parallelism needs parallel.tensor > 1; "
              "set parallel.sequence=false or raise parallel.tensor")
    if m.seq_length % (2 * p.context):
        _fail("model.seq_length", f"{m.seq_length} must be divisible by 2 × parallel.context "
              f"= {2 * p.context} (context parallelism splits it into 2·CP chunks)")
    if p.sequence and (m.seq_length // p.context) % p.tensor:
        _fail("parallel.sequence", f"each context-parallel rank's {m.seq_length // p.context} "
              f"tokens must split evenly over parallel.tensor={p.tensor} ranks; change "
              "model.seq_length or parallel.tensor")
    if p.context > 1 and m.attention_dropout > 0:
        _fail("parallel.context", "attention dropout is not supported under context "
              "parallelism; set model.attention_dropout=0 or parallel.context=1")
    if world_size % (p.tensor * p.context):
        _fail("parallel.tensor", f"world size {world_size} is not a multiple of "
              f"parallel.tensor × parallel.context = {p.tensor * p.context}; launch a multiple "
              f"of that many processes")


def _check_train(t: TrainConfig) -> None:
    _at_least(1, {"train.steps": t.steps, "train.micro_batch_size": t.micro_batch_size,
                  "train.grad_accum": t.grad_accum})
    if not t.lr > 0:
        _fail("train.lr", f"must be positive, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        _fail("train.min_lr", f"must be in [0, train.lr={t.lr}] (the schedule decays from lr "
              f"to min_lr), got {t.min_lr}")
    _at_least(0, {"train.keep_checkpoints": t.keep_checkpoints,
                  "train.warmup_steps": t.warmup_steps, "train.max_bad_steps": t.max_bad_steps,
                  "train.save_interval_minutes": t.save_interval_minutes}, off=True)


def _check_data(d: DataConfig) -> None:
    _at_least(1, {"data.vocab_size": d.vocab_size, "data.max_line_chars": d.max_line_chars})
    if not 0 <= d.val_fraction < 1:
        _fail("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    if d.tokenizer is not None and not Path(d.tokenizer).is_file():
        _fail("data.tokenizer", f"file {d.tokenizer!r} does not exist; point it at a "
              "SentencePiece .model or a tokenizer.json, or leave it unset to train one")
    if (d.join_rows == "every_n") != (d.join_rows_n is not None):
        _fail("data.join_rows_n", "give it (rows per document, >= 1) exactly when "
              f"data.join_rows=every_n (data.join_rows is {d.join_rows!r})")
    if d.join_rows_n is not None:
        _at_least(1, {"data.join_rows_n": d.join_rows_n})
    if d.streams is not None and d.streams < 1:
        _fail("data.streams", f"must be at least 1 (or unset), got {d.streams}")
    if d.url_retries < 0 or not d.url_backoff_s >= 0:
        _fail("data.url_retries", f"url_retries and url_backoff_s must be >= 0, got "
              f"{d.url_retries} and {d.url_backoff_s}")
    if d.url_suffix is not None and d.url_prefix is None:
        _fail("data.url_suffix", "is only used with data.url_prefix; set that too")
    _check_mixture(d)


def _check_mixture(d: DataConfig) -> None:
    """The mixture's own fields; its manifests are checked at start-up
    (``data/mixture.py``: ``check_sources``)."""
    labels = [source.label for source in d.mixture]
    for i, source in enumerate(d.mixture):
        if not (source.weight > 0 and math.isfinite(source.weight)):
            _fail(f"data.mixture[{i}] ({labels[i]})", f"weight must be a positive number, "
                  f"got {source.weight}")
        if labels[i] in labels[:i]:
            _fail(f"data.mixture[{i}] ({labels[i]})", "another source has the same name; "
                  "give each source its own name")
    if d.mixture and d.url_prefix is not None:
        _fail("data.url_prefix", "with data.mixture each source is read from its own "
              "manifest's url_prefix; set it there (in each source's manifest.json) instead")
    if d.mixture and d.shards != d.mixture[0].shards:
        _fail("data.shards", f"{d.shards!r}, but with data.mixture the run's data set is the "
              f"first source, {d.mixture[0].shards!r}; leave data.shards unset or set it to "
              "data.mixture[0].shards")


def _check_eval(e: EvalConfig, train_length: int) -> None:
    if not e.length_multipliers or min(e.length_multipliers) < 1:
        _fail("eval.length_multipliers", "give a non-empty list of integers >= 1")
    if e.stride is not None and (e.stride < 1 or train_length % e.stride):
        _fail("eval.stride", f"{e.stride} must be a positive divisor of model.seq_length="
              f"{train_length} (or unset for the training length)")
    _at_least(1, {"eval.tokens": e.tokens, "eval.batch_size": e.batch_size})
    _at_least(0, {"eval.interval": e.interval, "eval.passkey_samples": e.passkey_samples},
              off=True)
    if not all(0 <= d <= 1 for d in e.passkey_depths):
        _fail("eval.passkey_depths", "depths are fractions in [0, 1]")
    _at_least(1, {"eval.position_bins": e.position_bins})
    if e.harness_max_length is not None:
        _at_least(1, {"eval.harness_max_length": e.harness_max_length})
    if e.last_k is not None and not 1 <= e.last_k <= train_length:
        _fail("eval.last_k", f"{e.last_k} must be in [1, model.seq_length={train_length}] "
              "(or unset for model.seq_length)")
    _check_ruler(e.ruler)


def _check_ruler(r: RulerConfig) -> None:
    if r.length_multipliers is not None and (not r.length_multipliers
                                             or min(r.length_multipliers) < 1):
        _fail("eval.ruler.length_multipliers", "give a non-empty list of integers >= 1 (or "
              "unset for eval.length_multipliers)")
    if not r.depths or not all(0 <= d <= 1 for d in r.depths):
        _fail("eval.ruler.depths", f"depths are fractions in [0, 1], got {r.depths}")
    _at_least(1, {"eval.ruler.samples": r.samples})
    bad = sorted(set(r.scoring) - {"teacher_forced", "greedy"})
    if bad or not r.scoring:
        _fail("eval.ruler.scoring", f"choose teacher_forced and/or greedy, got {r.scoring}")
    if not 0 < r.threshold <= 1:
        _fail("eval.ruler.threshold", f"a fraction in (0, 1], got {r.threshold}")
    if r.absolute_threshold is not None and not 0 < r.absolute_threshold <= 1:
        _fail("eval.ruler.absolute_threshold", f"a score in (0, 1], got {r.absolute_threshold}")


def _check_task(t: TaskConfig) -> None:
    if t.variables not in range(1, 6):
        _fail("task.variables", f"counting programs use 1 to 5 variables, got {t.variables}")
    _at_least(1, {"task.train_samples": t.train_samples, "task.test_samples": t.test_samples})

