"""The prepared data set's on-disk format, read and written only here: ``manifest.json``
(what prep made: tokenizer, packing, splits and their shards) and the header record each
WebDataset shard starts with (its packing, so a shard mixed in from another prep is
caught). The manifest is written last and atomically: its presence means the data set is
complete.

Each split lists its shards as ``{"name", "samples", "sha256", "bytes"}`` (``shard_entry``):
the digest and size let a reader prove a shard holds the bytes prep wrote
(``data/integrity.py``). Manifests written before sizes were recorded lack ``bytes``; their
shards are checked by digest alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
"""The manifest's format version, written into every manifest."""
SHARD_META_KEY = "__shard__"
"""``__key__`` of each shard's first record, whose JSON holds the shard's packing."""


class DataError(UserError, RuntimeError):
    """Prepared data that cannot be read as it should; the message names the file."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_entry(path: Path, samples: int) -> dict:
    """The manifest's record of the finished shard at ``path``."""
    return {"name": path.name, "samples": samples, "sha256": file_sha256(path),
            "bytes": path.stat().st_size}


def manifest_path(shard_dir: str | Path) -> Path:
    return Path(shard_dir) / MANIFEST


def has_manifest(shard_dir: str | Path) -> bool:
    return manifest_path(shard_dir).is_file()


def read_manifest(shard_dir: str | Path) -> dict:
    path = manifest_path(shard_dir)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run `cope-megatron prep` first, or point "
                        "data.shards at a prepared directory")
    return json.loads(path.read_text())


def identity(manifest: dict) -> dict:
    """What the data is, for a checkpoint to record: its tokenizer's hash and a fingerprint
    of its shards (every split's names and hashes), whatever directory holds them."""
    shards = {split: [(s["name"], s["sha256"]) for s in entry["shards"]]
              for split, entry in manifest["splits"].items()}
    digest = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()
    return {"tokenizer_sha256": manifest["tokenizer_sha256"], "shards_fingerprint": digest[:16]}


def write_manifest(shard_dir: str | Path, manifest: dict) -> dict:
    """Write ``manifest`` (with the format version first) as the data set's last file."""
    manifest = {"format": FORMAT, **manifest}
    write_text_atomic(manifest_path(shard_dir), json.dumps(manifest, indent=1))
    return manifest
