import dataclasses

import pytest
import yaml

from cope_megatron.config import (
    Config,
    ConfigError,
    flat_keys,
    load_config,
    padded_vocab_size,
    validate,
)
from cope_megatron.startup import check


def test_yaml_files_compose_left_to_right_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("model: {hidden_size: 128, num_layers: 3}\ntrain: {steps: 5}\n")
    b.write_text("model: {hidden_size: 256}\n")
    cfg = load_config([str(a), str(b), "train.steps=9", "parallel.sequence=true"])
    assert cfg.model.hidden_size == 256  # later file wins
    assert cfg.model.num_layers == 3  # earlier file's other keys survive
    assert cfg.train.steps == 9  # override wins over files
    assert cfg.parallel.sequence is True
    assert cfg.model.num_attention_heads == Config().model.num_attention_heads  # default kept


def test_override_types_and_lists():
    cfg = load_config(["train.lr=1e-3", "data.corpus=[a.txt, b.txt]", "pe.cope.npos_max=16",
                       "model.num_query_groups=2", "data.tokenizer=null"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.data.corpus == ["a.txt", "b.txt"]
    assert cfg.pe.cope.npos_max == 16
    assert cfg.model.num_query_groups == 2
    assert load_config(["data.corpus=one.txt"]).data.corpus == ["one.txt"]


@pytest.mark.parametrize("source, needle", [
    ("model.hidden_sise=3", "model.hidden_sise"),
    ("nosuch.key=1", "nosuch"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("parallel.sequence=3", "parallel.sequence"),
    ("train.precision=fp8", "train.precision"),
    ("pe.bias_kernel=fast", "pe.bias_kernel"),
    ("model=3", "model"),
])
def test_unknown_keys_and_wrong_types_are_errors(source, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config([source])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("overrides, world, key", [
    (["model.num_attention_heads=6", "model.hidden_size=60", "parallel.tensor=4"], 4,
     "parallel.tensor"),
    (["model.hidden_size=65"], 1, "model.hidden_size"),
    (["model.seq_length=66", "parallel.context=2"], 2, "model.seq_length"),
    (["parallel.tensor=2"], 3, "parallel.tensor"),
    (["parallel.context=2"], 3, "parallel.tensor"),
    (["parallel.tensor=2", "parallel.context=2"], 6, "parallel.tensor"),
    (["model.seq_length=40", "parallel.context=2", "parallel.tensor=8", "parallel.sequence=true",
      "model.num_attention_heads=8"], 16, "parallel.sequence"),
    (["parallel.context=2", "model.attention_dropout=0.1"], 2, "parallel.context"),
    (["parallel.context=2", "model.pe=cope", "pe.cope.impl=reference"], 2, "pe.cope.impl"),
    (["model.pe=cope_rope", "pe.cope.npos_max=1"], 1, "pe.cope.npos_max"),
    (["model.pe=cope", "model.attention_dropout=0.1"], 1, "model.attention_dropout"),
    (["model.pe=alibi", "pe.bias_kernel=flex", "model.attention_dropout=0.1"], 1,
     "pe.bias_kernel"),
    (["model.pe=fancy"], 1, "model.pe"),
    (["parallel.sequence=true"], 1, "parallel.sequence"),
    (["zero.stage=4"], 1, "zero.stage"),
    (["data.tokenizer=/no/such/tok.model"], 1, "data.tokenizer"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups"),
    (["train.steps=0"], 1, "train.steps"),
    (["eval.length_multipliers=[]"], 1, "eval.length_multipliers"),
    (["eval.stride=48"], 1, "eval.stride"),
    (["eval.tokens=0"], 1, "eval.tokens"),
    (["eval.passkey_depths=[0.5, 2]"], 1, "eval.passkey_depths"),
])
def test_validation_names_the_key(overrides, world, key):
    """The start-up check: the config's own fields, and what the PE's entry checks."""
    cfg = load_config(overrides)
    with pytest.raises(ConfigError) as err:
        check(cfg, world, data=False)
    assert str(err.value).startswith(key + ":")


def test_pe_options_are_checked_only_for_their_pe():
    check(load_config(["model.pe=rope", "pe.cope.npos_max=1", "model.attention_dropout=0.1"]),
          1, data=False)


def test_every_entry_point_refuses_an_unknown_pe_before_starting(prepared, tmp_path, capsys):
    """train, the launch scripts' pre-check, estimate and sweep all go through one check:
    an unknown PE is one line naming model.pe, exit 2, nothing created."""
    from cope_megatron.cli import main as cli
    from cope_megatron.launch import precheck, sweep

    shards, _, _ = prepared
    bad = ["model.pe=fancy", f"data.shards={shards}", "model.seq_length=32",
           f"run.dir={tmp_path / 'run'}"]
    for entry in (lambda: cli(["train", *bad]), lambda: cli(["estimate", *bad]),
                  lambda: precheck.main(["--world", "1", *bad])):
        assert entry() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [err[0]] and err[0].startswith("error: model.pe: unknown position "
                                                     "encoding 'fancy'"), err
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "out": str(tmp_path / "sweep"),
                                    "base": bad, "axes": {"train.lr": [1e-3]}}))
    with pytest.raises(ConfigError, match="^model.pe: unknown"):
        sweep.create(sweep.load_spec(spec))
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_run_dir_that_is_a_file_is_refused(prepared, tmp_path):
    shards, _, _ = prepared
    (tmp_path / "run").write_text("")
    cfg = load_config([f"data.shards={shards}", "model.seq_length=32",
                       f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="^run.dir: .* is a file"):
        check(cfg, 1)


def test_valid_layouts_pass():
    validate(load_config(["parallel.tensor=2", "parallel.sequence=true"]), 4)
    validate(load_config(["parallel.tensor=2", "parallel.sequence=true", "parallel.context=2",
                          "model.pe=cope"]), 8)
    validate(load_config([]), 1)


def test_missing_data_path_says_to_run_prep(tmp_path):
    cfg = load_config([f"data.shards={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="cope-megatron prep"):
        check(cfg, 1)


def test_shards_packed_for_another_length_are_refused(prepared, tmp_path):
    shards, _, _ = prepared
    cfg = load_config([f"data.shards={shards}", "model.seq_length=64"])
    with pytest.raises(ConfigError, match="model.seq_length: 64.*packed for 32"):
        check(cfg, 1)
    check(load_config([f"data.shards={shards}", "model.seq_length=32",
                       f"run.dir={tmp_path / 'run'}"]), 1)


def test_vocab_padding_is_layout_independent():
    assert padded_vocab_size(300, 1) == padded_vocab_size(300, 2) == 384
    assert padded_vocab_size(300, 3) % 3 == 0


PUBLIC_KEYS = """
    model.pe model.pe_schedule model.num_layers model.hidden_size model.num_attention_heads
    model.num_query_groups model.ffn_hidden_size model.seq_length model.attention_dropout
    model.hidden_dropout model.init_method_std model.normalization model.untie_embeddings
    pe.rope.base pe.rope.percent pe.rope.keep_frequencies pe.rope_scaling.type
    pe.rope_scaling.factor pe.rope_scaling.original_length pe.rope_scaling.beta_fast
    pe.rope_scaling.beta_slow pe.rope_scaling.mscale pe.length_scale.type pe.length_scale.s
    pe.cope.npos_max pe.cope.shared_table pe.cope.impl pe.alibi.slopes
    pe.t5.num_buckets pe.t5.max_distance pe.fire.mlp_width pe.fire.c_init
    pe.fire.threshold_init pe.kerple.variant pe.kerple.max_exponent pe.bias_kernel
    parallel.tensor parallel.sequence parallel.context
    zero.stage zero.deepspeed fusion.layers fusion.cross_entropy fusion.chunk_tokens
    data.corpus data.cache_dir data.shards data.mixture data.tokenizer
    data.tokenizer_type data.vocab_size data.byte_fallback data.user_symbols data.text_field
    data.val_fraction data.shard_max_bytes data.prep_workers data.tokenizer_sample_bytes
    data.max_docs data.num_workers data.streams data.shuffle_buffer data.on_error
    data.verify data.decode_errors data.max_line_chars data.eos_token data.pad_token
    data.document_boundaries
    data.join_rows data.join_rows_n data.url_prefix data.url_suffix data.url_retries
    data.url_backoff_s task.name
    task.seed task.train_samples task.test_samples task.variables task.files train.steps
    train.seed
    train.micro_batch_size train.grad_accum train.lr train.min_lr train.warmup_steps
    train.weight_decay train.beta1 train.beta2 train.grad_clip train.max_bad_steps
    train.lr_decay train.precision train.recompute train.peak_tflops
    train.log_interval train.save_interval train.save_interval_minutes train.keep_checkpoints
    eval.interval eval.tokens eval.batch_size
    eval.length_multipliers eval.stride eval.data eval.passkey_samples
    eval.passkey_depths eval.harness_tasks eval.harness_include eval.harness_limit
    eval.harness_model eval.harness_max_length
    eval.position_loss eval.last_k eval.position_bins eval.ruler.tasks
    eval.ruler.length_multipliers eval.ruler.depths eval.ruler.samples eval.ruler.seed
    eval.ruler.haystack eval.ruler.scoring eval.ruler.threshold eval.ruler.absolute_threshold
    logging.wandb logging.project logging.progress
    run.dir run.name run.resume run.allow_config_change
""".split()


def test_public_flag_surface_is_frozen():
    """Scripts and docs depend on these names: adding or renaming a key means editing
    this list on purpose."""
    assert flat_keys() == PUBLIC_KEYS
    fixed = {"model.pe", "parallel.tensor", "parallel.sequence", "parallel.context",
             "zero.stage", "train.steps", "train.seed", "run.dir"}
    assert fixed <= set(PUBLIC_KEYS)


def test_every_config_file_in_repo_loads_and_validates():
    from pathlib import Path

    from cope_megatron.launch.sweep import load_spec, runs

    root = Path(__file__).resolve().parents[1] / "configs"
    sweeps = sorted((root / "sweeps").glob("*.yaml"))
    files = sorted(set(root.rglob("*.yaml")) - set(sweeps))
    assert len(files) >= 10 and len(sweeps) >= 2
    for f in files:
        cfg = load_config([str(f)])
        check(cfg, cfg.parallel.tensor * cfg.parallel.context, data=False)
        assert dataclasses.is_dataclass(cfg)
    for f in sweeps:  # every run of every shipped sweep is a valid config on its world
        spec = load_spec(f)
        for run in runs(spec):
            check(load_config(run.overrides), spec.nodes * spec.gpus_per_node, data=False)


def test_deepspeed_config_is_derived_and_passthrough_merges():
    from cope_megatron.distributed.deepspeed_glue import deepspeed_config

    cfg = load_config(["zero.stage=2", "train.micro_batch_size=3", "train.grad_accum=2",
                       "zero.deepspeed={zero_optimization: {overlap_comm: true}, "
                       "gradient_clipping: 0.5}"])
    ds = deepspeed_config(cfg, dp_size=4)
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 0.5  # passthrough wins


def test_every_config_key_used_in_code_exists():
    """Drift check: each ``cfg.section.key`` the code reads is in the schema."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    keys = set(flat_keys())
    sections = {k.split(".")[0] for k in keys}
    used = set()
    for path in root.glob("cope_megatron/**/*.py"):
        for match in re.finditer(r"\bcfg\.(\w+)\.(\w+)(?:\.(\w+))?", path.read_text()):
            if match.group(1) in sections:
                used.add(".".join(g for g in match.groups() if g))
    assert len(used) > 30
    missing = {u for u in used if u not in keys and not any(k.startswith(u + ".") for k in keys)}
    assert not missing, missing
