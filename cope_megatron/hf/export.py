"""``cope-megatron export RUN_DIR OUT_DIR``: a run's latest checkpoint as a Hugging Face
model directory (config.json, model.safetensors, generation config, and the data set's
tokenizer: its tokenizer.json as itself, for ``PreTrainedTokenizerFast``, or its SentencePiece
model through ``tokenization_cope_megatron.py``, loaded with ``trust_remote_code=True``).
The model is a standard
architecture where one computes exactly ours (``hf.standard``: GPT-NeoX for RoPE, GPT-2 for
learned positions), else ``modeling_cope_megatron.py`` (and its ``kv_cache.py``), shipped
beside the weights.

Weights come from DeepSpeed's per-TP-rank model-states files, which hold every parameter
whole under ZeRO 0–2; tensor-parallel shards are concatenated along the dimension the
checkpoint's own TP layout names (``checkpoint.universal.checkpoint_info``, the record
resumes on another DP size use too). ZeRO-3
partitions the weights themselves: DeepSpeed's ``zero_to_fp32`` gathers them (at TP=1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cope_megatron import checkpoint
from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.checkpoint.universal import INFO, read_layout, tp_merge_dim
from cope_megatron.config import Config, load_config, padded_vocab_size
from cope_megatron.data.format import read_manifest
from cope_megatron.data.tokenizer import dataset_tokenizer, is_huggingface
from cope_megatron.errors import UserError
from cope_megatron.hf.standard import BUILDERS, rename, standard_architecture
from cope_megatron.output_dir import check_output_dir
from cope_megatron.pe.length_scale import initial_s
from cope_megatron.pe.rope_scaling import original_length, scaling_type
from cope_megatron.startup import check

HERE = Path(__file__).resolve().parent
MARKER = "cope_megatron.json"
"""Written first into every export, so that even a half-written one is ours to redo
(``output_dir``); it records the step only once the export is complete."""

MODELING_FILES = ("modeling_cope_megatron.py", "kv_cache.py")
"""Shipped beside the weights of a model no standard architecture computes."""

NAMES = [  # Megatron name -> ours, by regular expression
    (r"^embedding\.word_embeddings\.", "word_embeddings."),
    (r"^embedding\.position_embeddings\.", "position_embeddings."),
    (r"^decoder\.final_layernorm\.", "final_layernorm."),
    (r"^decoder\.layers\.(\d+)\.mlp\.", r"layers.\1."),
    (r"^decoder\.layers\.(\d+)\.self_attention\.core_attention\.attention\.table$",
     r"layers.\1.self_attention.cope_table"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.core_attention\.attention\.bias$",
     r"layers.\1.self_attention.t5_bias"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.core_attention\.length_scale\.s$",
     r"layers.\1.self_attention.length_scale"),
    # Every other PE parameter (Kerple, FIRE) keeps its name on the attention.
    (r"^decoder\.layers\.(\d+)\.self_attention\.core_attention\.attention\.",
     r"layers.\1.self_attention."),
    (r"^decoder\.layers\.(\d+)\.", r"layers.\1."),
    (r"^output_layer\.", "output_layer."),
]


class ExportError(UserError, ValueError):
    """A run that cannot be exported; the message says why and what to do."""


def _merge(name: str, shards: list[torch.Tensor], info: dict) -> torch.Tensor:
    dim = tp_merge_dim(name, info) if len(shards) > 1 else None
    return shards[0] if dim is None else torch.cat(shards, dim=dim)


def megatron_state_dict(run_dir: Path, cfg: Config) -> tuple[dict[str, torch.Tensor], int]:
    """The latest checkpoint's full parameters by Megatron name, fp32, and its step."""
    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise ExportError(f"no checkpoint in {checkpoint.checkpoint_dir(run_dir)}; train first")
    root = checkpoint.checkpoint_dir(run_dir)
    if read_layout(root / tag)["zero_stage"] == 3:
        if cfg.parallel.tensor > 1:
            raise ExportError(
                f"{root / tag}: ZeRO-3 with tensor parallelism partitions every TP shard "
                "over the data-parallel ranks; export gathers ZeRO-3 at TP=1 only. Resume "
                "the run for one step with zero.stage=2 (its checkpoint is converted) and "
                "export that")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        params = get_fp32_state_dict_from_zero_checkpoint(str(root), tag)
        step = torch.load(root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                          weights_only=False).get("step", 0)
        return {k: v.float() for k, v in params.items() if not k.endswith("_extra_state")}, step
    files = [root / tag / f"mp_rank_{r:02d}_model_states.pt" for r in range(cfg.parallel.tensor)]
    states = [torch.load(f, weights_only=False, map_location="cpu") for f in files]
    modules = [s["module"] for s in states]
    info = states[0][INFO]  # the TP layout the run saved (checkpoint.universal)
    params = {name: _merge(name, [m[name] for m in modules], info).float()
              for name in modules[0] if not name.endswith("_extra_state")}
    return params, states[0].get("step", 0)


def hf_config(cfg: Config, vocab_size: int):
    from cope_megatron.hf.modeling_cope_megatron import CopeMegatronConfig

    m, r, s = cfg.model, cfg.pe.rope, cfg.pe.rope_scaling
    return CopeMegatronConfig(
        vocab_size=padded_vocab_size(vocab_size, cfg.parallel.tensor),
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        intermediate_size=m.ffn_hidden_size, normalization=m.normalization, pe=m.pe,
        pe_schedule=m.pe_schedule,
        max_position_embeddings=m.seq_length, rope_theta=r.base, rope_percent=r.percent,
        rope_keep_frequencies=r.keep_frequencies, rope_scaling_type=scaling_type(cfg),
        rope_scaling_factor=s.factor, rope_original_length=original_length(cfg),
        yarn_beta_fast=s.beta_fast, yarn_beta_slow=s.beta_slow, yarn_mscale=s.mscale,
        cope_npos_max=cfg.pe.cope.npos_max, cope_shared_table=cfg.pe.cope.shared_table,
        t5_num_buckets=cfg.pe.t5.num_buckets, t5_max_distance=cfg.pe.t5.max_distance,
        length_scale=cfg.pe.length_scale.type,
        length_scale_s=initial_s(cfg.pe.length_scale, m.seq_length),
        fire_mlp_width=cfg.pe.fire.mlp_width, fire_threshold_init=cfg.pe.fire.threshold_init,
        kerple_variant=cfg.pe.kerple.variant, kerple_max_exponent=cfg.pe.kerple.max_exponent,
        tie_word_embeddings=not m.untie_embeddings)


def save_tokenizer(shards: Path, manifest: dict, out_dir: Path) -> None:
    """The data set's tokenizer into ``out_dir``, for ``AutoTokenizer``, with the
    end-of-document and padding tokens prep used."""
    tokenizer = dataset_tokenizer(shards, manifest)
    specials = {"eos_token": tokenizer.token(tokenizer.eos_id)}
    if tokenizer.pad_id is not None:
        specials["pad_token"] = tokenizer.token(tokenizer.pad_id)
    if is_huggingface(tokenizer.path):
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.path),
                                clean_up_tokenization_spaces=False,
                                **specials).save_pretrained(out_dir)
        # The very file prep tokenized with (save_pretrained writes its own serialization).
        shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
        return
    from cope_megatron.hf.tokenization_cope_megatron import CopeMegatronTokenizer

    shutil.copyfile(HERE / "tokenization_cope_megatron.py",
                    out_dir / "tokenization_cope_megatron.py")
    CopeMegatronTokenizer.register_for_auto_class("AutoTokenizer")
    CopeMegatronTokenizer(str(tokenizer.path), **specials).save_pretrained(out_dir)


def export(run_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the Hugging Face model directory for the run's latest checkpoint; a non-empty
    ``out_dir`` that is not an earlier export is refused unless ``force``."""
    from cope_megatron.hf.modeling_cope_megatron import CopeMegatronForCausalLM

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} has no config.yaml: give a run directory")
    check_output_dir(out_dir, (MARKER,), "Hugging Face export", force=force)
    cfg = load_config([str(run_dir / "config.yaml")])
    pe = check(cfg, cfg.parallel.tensor * cfg.parallel.context)
    shards = Path(cfg.data.shards)
    manifest = read_manifest(shards)
    params, step = megatron_state_dict(run_dir, cfg)
    try:
        state = rename(params, NAMES)
    except ValueError as e:
        raise ExportError(str(e)) from e
    config = hf_config(cfg, manifest["vocab_size"])
    standard = standard_architecture(cfg, pe)
    if standard:
        model = BUILDERS[standard](cfg, config.vocab_size, state)
    else:
        model = CopeMegatronForCausalLM(config)
        if config.tie_word_embeddings:
            state["output_layer.weight"] = state["word_embeddings.weight"]
        model.load_state_dict(state, strict=True)
        CopeMegatronForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        model.config.register_for_auto_class()
    for config in (model.config, model.generation_config):
        config.eos_token_id = manifest.get("eos_id")
        config.pad_token_id = manifest.get("pad_id")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / MARKER, json.dumps({"run_dir": str(run_dir)}))
    model.save_pretrained(out_dir)
    if not standard:
        for name in MODELING_FILES:
            shutil.copyfile(HERE / name, out_dir / name)
    if manifest["tokenizer"] in ("tokenizer.model", "tokenizer.json"):  # not a task's vocab
        save_tokenizer(shards, manifest, out_dir)
    write_text_atomic(out_dir / MARKER, json.dumps(
        {"run_dir": str(run_dir), "step": step, "pe": cfg.model.pe,
         "architecture": standard or "cope_megatron"}, indent=1))
    return out_dir
