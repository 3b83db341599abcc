"""The one start-up check of every entry point (``train``, ``eval``, ``export``,
``estimate``, ``sweep`` and the launch scripts' pre-check), before any process group,
model or file exists: the PE and its options, the parallel layout on ``world`` processes,
the prepared data and the run directory."""

from __future__ import annotations

from pathlib import Path

from cope_megatron.config import Config, ConfigError, validate
from cope_megatron.data.format import has_manifest, manifest_path, read_manifest
from cope_megatron.pe import PositionEncoding, get_pe


def check(cfg: Config, world: int, *, data: bool = True) -> PositionEncoding:
    """Raise ConfigError naming the key for anything that cannot run; return the resolved
    PE, which the caller passes down. ``data``: the run reads ``data.shards`` and writes
    ``run.dir`` (``estimate`` needs neither)."""
    pe = get_pe(cfg.model.pe)
    validate(cfg, world)
    if pe.check is not None:
        pe.check(cfg)
    if data:
        _check_data(cfg)
        run_dir = Path(cfg.run.dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run.dir: {run_dir} is a file, not a directory; point run.dir "
                              "at a directory (it is created if missing)")
    return pe


def _check_data(cfg: Config) -> None:
    """Training and evaluation need prepared shards packed for the model's length."""
    if not has_manifest(cfg.data.shards):
        raise ConfigError(
            f"data.shards: no manifest at {manifest_path(cfg.data.shards)}; run `cope-megatron "
            "prep` with the same configs first, or point data.shards at a prepared directory")
    packed = read_manifest(cfg.data.shards)["seq_len"]
    if packed != cfg.model.seq_length:
        raise ConfigError(
            f"model.seq_length: {cfg.model.seq_length}, but the shards in {cfg.data.shards} "
            f"were packed for {packed}; set model.seq_length={packed} or re-run prep into "
            "another data.shards")
