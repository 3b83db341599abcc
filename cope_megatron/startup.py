"""The one start-up check of every entry point (``train``, ``eval``, ``export``,
``estimate``, ``sweep`` and the launch scripts' pre-check), before any process group,
model or file exists: the PE and its options, the parallel layout on ``world`` processes,
the prepared data (its shards present and whole: ``data.integrity``) and the run
directory."""

from __future__ import annotations

import warnings
from pathlib import Path

from cope_megatron.config import Config, ConfigError, validate
from cope_megatron.data import integrity
from cope_megatron.data.format import DataError, has_manifest, manifest_path, read_manifest
from cope_megatron.data.mixture import check_sources
from cope_megatron.data.source import located, split_shards
from cope_megatron.eval.ruler.tasks import check_tasks
from cope_megatron.pe import ModelPE, model_pe, rope_scaling


def check(cfg: Config, world: int, *, data: bool = True) -> ModelPE:
    """Raise ConfigError naming the key (DataError naming the shard) for anything that
    cannot run; return the resolved PE, which the caller passes down. ``data``: the run
    reads ``data.shards`` and writes ``run.dir`` (``estimate`` needs neither)."""
    pe = model_pe(cfg.model)
    validate(cfg, world)
    rope_scaling.check(cfg, pe)
    if pe.check is not None:
        pe.check(cfg)
    check_tasks(cfg.eval.ruler.tasks)
    if data:
        _check_data(cfg)
        run_dir = Path(cfg.run.dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.dir: {run_dir} is a file, not a directory; point run.dir "
                              "at a directory (it is created if missing)")
    return pe


def _check_data(cfg: Config) -> None:
    """Training and evaluation need prepared shards packed for the model's length (a
    mixture: every source, all sharing the first one's tokenizer and length)."""
    for source, manifest in zip(cfg.data.mixture[1:], check_sources(cfg.data.mixture)[1:]):
        _check_shards(cfg, source.shards, manifest)
    if not has_manifest(cfg.data.shards):
        raise ConfigError(
            f"data.shards: no manifest at {manifest_path(cfg.data.shards)}; run `cope-megatron "
            "prep` with the same configs first, or point data.shards at a prepared directory")
    manifest = located(read_manifest(cfg.data.shards), cfg.data.url_prefix, cfg.data.url_suffix)
    packed = manifest["seq_len"]
    if packed != cfg.model.seq_length:
        raise ConfigError(
            f"model.seq_length: {cfg.model.seq_length}, but the shards in {cfg.data.shards} "
            f"were packed for {packed}; set model.seq_length={packed} or re-run prep into "
            "another data.shards")
    _check_shards(cfg, cfg.data.shards, manifest)


def _check_shards(cfg: Config, shard_dir: str, manifest: dict) -> None:
    """Every shard present with its recorded size; with ``data.verify=startup`` also its
    sha256. Under ``data.on_error=skip`` bad shards are only announced: the loader skips
    and counts them when it reaches them."""
    shards = [shard for split in manifest["splits"]
              for shard in split_shards(shard_dir, manifest, split)]
    problems = (integrity.verify_all(shards) if cfg.data.verify == "startup"
                else integrity.check_present(shards))
    if not problems:
        return
    more = f" (and {len(problems) - 1} more bad shards)" if len(problems) > 1 else ""
    if cfg.data.on_error != "skip":
        raise DataError(f"{problems[0]}{more}; {integrity.RERUN}")
    warnings.warn(f"data.on_error=skip: {len(problems)} bad shards will be skipped: "
                  f"{problems[0]}{more}", stacklevel=2)
