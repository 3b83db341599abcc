"""Reading prepared shard data sets: the manifest, one split's shards, and their samples
checked against the manifest (evaluation reads them in order; training through
``streams`` and ``loader``).

Before a local shard is first read, its bytes are checked against the manifest's sha256
(``integrity``; ``data.verify``); a remote one (``http(s)://``, ``pipe:``; ``remote``) is
hashed as it streams and checked when its end is reached (a read that stops short of
the end reads on to it, once per process). Every token id is checked against the
vocabulary, so a bad shard is named here, never met as an index error in the embedding.

A data set may carry a loss mask (``loss_mask`` in its manifest): each sample then also
holds ``mask.npy``, one 0/1 per prediction [seq_len], beside ``tokens.npy`` [seq_len + 1].
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

from cope_megatron.data import integrity
from cope_megatron.data.format import SHARD_META_KEY, DataError
from cope_megatron.data.remote import ShardStream, is_remote


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int
    sha256: str | None = None
    bytes: int | None = None
    """Size recorded by prep; None in older manifests."""
    local: bool = True
    """A file on this machine, hence checkable (``integrity``); False behind a url_prefix."""


@dataclass(frozen=True)
class StreamSpec:
    """One split's data and how a rank reads it (see ``streams`` and ``loader``)."""

    shards: tuple[ShardInfo, ...]
    seq_len: int
    dtype: str
    tokenizer_sha256: str
    seed: int
    micro_batch_size: int
    grad_accum: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    num_workers: int = 1
    streams: int | None = None
    """Virtual streams the data order is made of; None: gcd(global batch, 64)."""
    shuffle_buffer: int = 1000
    """Samples per shuffled block of a stream."""
    on_error: str = "raise"
    loss_mask: bool = False
    verify: str = "first_read"
    """When a shard's sha256 is checked (``data.verify``: startup, first_read, off)."""
    vocab_size: int | None = None
    """Token ids must be below this (None: unchecked)."""
    url_retries: int = 3
    """Reopenings of a remote shard's stream before its read fails (``remote``)."""
    url_backoff_s: float = 1.0
    """Wait before the first reopening; doubled before each next one."""

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    @property
    def num_streams(self) -> int:
        return self.streams or math.gcd(self.global_batch, 64)


def split_shards(shard_dir: str | Path, manifest: dict, split: str) -> tuple[ShardInfo, ...]:
    """The shards of ``split``; ``manifest['url_prefix']``, when set, replaces the directory
    (e.g. ``pipe:aws s3 cp s3://bucket/data/`` followed by the shard name and `` -``): such
    shards are remote, so their presence and digest go unchecked (``integrity``)."""
    entries = manifest["splits"][split]["shards"]
    if not entries or not sum(e["samples"] for e in entries):
        raise DataError(f"{shard_dir}: the {split!r} split holds no samples; re-run prep with "
                        "more text or a shorter seq_len")
    prefix, suffix = manifest.get("url_prefix"), manifest.get("url_suffix", "")
    def url(name: str) -> str:
        return f"{prefix}{name}{suffix}" if prefix else str(Path(shard_dir) / name)

    return tuple(ShardInfo(url=url(e["name"]), samples=e["samples"], sha256=e.get("sha256"),
                           bytes=e.get("bytes"), local=not is_remote(url(e["name"])))
                 for e in entries)


def located(manifest: dict, url_prefix: str | None, url_suffix: str | None) -> dict:
    """``manifest`` with its shards read from ``url_prefix`` + name + ``url_suffix``
    (``data.url_prefix``/``data.url_suffix``) when given; its own location otherwise."""
    if url_prefix is None:
        return manifest
    return {**manifest, "url_prefix": url_prefix, "url_suffix": url_suffix or ""}


def split_spec(shard_dir: str | Path, manifest: dict, split: str, **kw) -> StreamSpec:
    """The stream of one split: its shards, and its sample length (task data sets give
    each split its own) and format from the manifest; ``kw`` sets the rest."""
    kw.setdefault("seed", 0)
    kw.setdefault("micro_batch_size", 1)
    return StreamSpec(
        shards=split_shards(shard_dir, manifest, split),
        seq_len=manifest["splits"][split].get("seq_len", manifest["seq_len"]),
        dtype=manifest["dtype"],
        tokenizer_sha256=manifest["tokenizer_sha256"],
        loss_mask=manifest.get("loss_mask", False),
        vocab_size=manifest["vocab_size"],
        **kw,
    )


def _check_meta(url: str, meta: dict, spec: StreamSpec) -> None:
    for key, want in (("seq_len", spec.seq_len), ("dtype", spec.dtype),
                      ("tokenizer_sha256", spec.tokenizer_sha256),
                      ("loss_mask", spec.loss_mask)):
        if meta.get(key, False) != want:
            raise DataError(
                f"shard {url}: {key} is {meta.get(key)!r} but the manifest says {want!r}; the "
                "shard comes from a different prep: re-run prep into a fresh directory"
            )


def _check_ids(url: str, key: str, tokens: np.ndarray, vocab_size: int | None) -> None:
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(f"shard {url}: sample {key} holds token id {int(tokens.max())}, but the "
                        f"vocabulary has {vocab_size} ids: the shard does not belong to this "
                        "data set's tokenizer; re-run prep into a fresh directory")


Sample = tuple[np.ndarray, np.ndarray | None]
"""(tokens [seq_len + 1], loss mask [seq_len] or None)."""


def shard_samples(shard: ShardInfo, first: int, end: int, spec: StreamSpec) -> Iterator[Sample]:
    """Samples [first, end) of one shard, each checked against the manifest."""
    check = spec.verify != "off"
    if check and shard.local:
        integrity.ensure_verified(shard)
    stream = (ShardStream(shard.url) if shard.local else
              ShardStream(shard.url, shard.bytes, spec.url_retries, spec.url_backoff_s))
    with stream:
        files = tar_file_iterator(io.BufferedReader(stream, 1 << 20))
        records = group_by_keys({**f, "__url__": shard.url} for f in files)
        yield from _records(shard.url, records, first, end, spec)
        if check and not shard.local and not integrity.is_verified(shard):
            while stream.read(1 << 20):  # on to the end: the digest covers every byte
                pass
            integrity.ensure_streamed(shard, stream.sha256.hexdigest(), stream.pos)


def _records(url: str, records: Iterator[dict], first: int, end: int,
             spec: StreamSpec) -> Iterator[Sample]:
    index = 0
    checked = False
    for record in records:
        if record["__key__"] == SHARD_META_KEY:
            _check_meta(url, json.loads(record["json"]), spec)
            checked = True
            continue
        if not checked:
            raise DataError(f"shard {url} has no {SHARD_META_KEY} header record, so it was not "
                            "written by `cope-megatron prep`; re-run prep")
        if first <= index < end:
            tokens = np.load(io.BytesIO(record["tokens.npy"]), allow_pickle=False)
            if tokens.shape != (spec.seq_len + 1,) or tokens.dtype.name != spec.dtype:
                raise DataError(f"shard {url}: sample {record['__key__']} has shape "
                                f"{tokens.shape} {tokens.dtype}, expected ({spec.seq_len + 1},) "
                                f"{spec.dtype}; re-run prep")
            _check_ids(url, record["__key__"], tokens, spec.vocab_size)
            mask = None
            if spec.loss_mask:
                mask = np.load(io.BytesIO(record["mask.npy"]), allow_pickle=False)
                if mask.shape != (spec.seq_len,):
                    raise DataError(f"shard {url}: sample {record['__key__']} has a loss mask "
                                    f"of shape {mask.shape}, expected ({spec.seq_len},); "
                                    "re-run prep")
            yield tokens, mask
        index += 1
        if index >= end:
            return
    if index < end:
        raise DataError(f"shard {url}: holds {index} samples but the manifest lists more; "
                        "the shard is truncated: re-run prep")


def ordered_samples(spec: StreamSpec) -> Iterator[Sample]:
    """Every sample of ``spec``'s shards once, in order (evaluation)."""
    for shard in spec.shards:
        yield from shard_samples(shard, 0, shard.samples, spec)


def sequential_windows(spec: StreamSpec, length: int) -> Iterator[torch.Tensor]:
    """Consecutive windows of ``length`` tokens from a split read in order.

    Packed samples are contiguous, non-overlapping slices of the split's token stream, so
    concatenating them gives windows longer than the training length (for extrapolation);
    but for one join per input file, whose last partial sample prep packs at the end.
    """
    buf = np.empty(0, dtype=np.int64)
    for sample, _ in ordered_samples(spec):
        buf = np.concatenate([buf, sample.astype(np.int64)])
        while len(buf) >= length:
            yield torch.from_numpy(buf[:length].copy())
            buf = buf[length:]
