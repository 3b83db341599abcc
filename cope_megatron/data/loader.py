"""Stream packed token samples from WebDataset shards, split by data-parallel rank and
DataLoader worker, deterministic and exactly resumable.

Each epoch, the shards are put in a seeded order and the concatenated sample sequence is
cut into ``dp_size × num_workers`` contiguous, near-equal ranges, one per (rank, worker)
slot: every sample is seen exactly once per epoch, even with fewer shards than slots, and
each slot reads only the shards its range touches. Each slot shuffles through a seeded
buffer and runs on into the next epoch, so streams never end and ranks never wait.

DataLoader takes batches from its workers round-robin, so the ``batches`` consumed by a
rank fixes how many each worker produced: resuming replays exactly that many per worker
(reading, not training) and continues with the samples an uninterrupted run would see.
TP and CP ranks of one replica share a dp_rank, hence their samples.

A data set may carry a loss mask (``loss_mask`` in its manifest): each sample then also
holds ``mask.npy``, one 0/1 per prediction, and batches hold ``loss_mask`` [b, seq_len]
beside ``tokens`` [b, seq_len + 1] so that only the marked predictions are trained on.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.shards import SHARD_META_KEY

# Workers start from a fork server, never by forking the trainer: by the time a loader
# starts, the trainer runs threads (gloo, OpenMP, DeepSpeed), and a child forked from a
# threaded process can inherit a lock held mid-operation and crash (it did: SIGSEGV in a
# worker, in the full suite's order only). The server imports this module once, so each
# worker forks in ~0.1 s instead of importing torch anew as under spawn.
WORKER_CONTEXT = multiprocessing.get_context("forkserver")
WORKER_CONTEXT.set_forkserver_preload([__name__])


class DataError(RuntimeError):
    """Bad training data; the message names the shard and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[ShardInfo, ...]
    seq_len: int
    dtype: str
    tokenizer_sha256: str
    seed: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    num_workers: int = 1
    shuffle_buffer: int = 1000
    on_error: str = "raise"
    loss_mask: bool = False

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: run `cope-megatron prep` first, or point data.shards at a "
            "prepared directory"
        )
    return json.loads(path.read_text())


def split_shards(shard_dir: str | Path, manifest: dict, split: str) -> tuple[ShardInfo, ...]:
    """The shards of ``split``; ``manifest['url_prefix']``, when set, replaces the directory
    (e.g. ``pipe:aws s3 cp s3://bucket/data/`` followed by the shard name and `` -``)."""
    entries = manifest["splits"][split]["shards"]
    if not entries or not sum(e["samples"] for e in entries):
        raise DataError(f"{shard_dir}: the {split!r} split holds no samples; re-run prep with "
                        "more text or a shorter seq_len")
    prefix, suffix = manifest.get("url_prefix"), manifest.get("url_suffix", "")
    def url(name: str) -> str:
        return f"{prefix}{name}{suffix}" if prefix else str(Path(shard_dir) / name)

    return tuple(ShardInfo(url=url(e["name"]), samples=e["samples"]) for e in entries)


def slot_ranges(spec: StreamSpec, epoch: int, slot: int) -> list[tuple[ShardInfo, int, int]]:
    """(shard, first sample, end sample) pieces covering this slot's range in ``epoch``."""
    order = list(spec.shards)
    random.Random(f"{spec.seed}:shards:{epoch}").shuffle(order)
    slots = spec.dp_size * spec.num_workers
    total = spec.total_samples
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    pieces, start = [], 0
    for shard in order:
        end = start + shard.samples
        if end > lo and start < hi:
            pieces.append((shard, max(lo, start) - start, min(hi, end) - start))
        start = end
    return pieces


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


Sample = tuple[np.ndarray, np.ndarray | None]
"""(tokens [seq_len + 1], loss mask [seq_len] or None)."""


def _shard_samples(url: str, first: int, end: int, spec: StreamSpec) -> Iterator[Sample]:
    """Samples [first, end) of one shard, each checked against the manifest."""
    stream = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
    index = 0
    checked = False
    for record in stream:
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


class TokenStream(IterableDataset):
    """Endless stream of [micro_batch, seq_len + 1] int64 batches for one dp rank."""

    def __init__(self, spec: StreamSpec, start_batches: int = 0) -> None:
        self.spec = spec
        self.start_batches = start_batches
        self.skipped_shards = 0

    def _samples(self, slot: int) -> Iterator[Sample]:
        epoch = 0
        while True:
            rng = random.Random(f"{self.spec.seed}:buffer:{epoch}:{slot}")
            pieces = (self._guarded(shard, lo, hi) for shard, lo, hi in
                      slot_ranges(self.spec, epoch, slot))
            shuffle = wds.shuffle(self.spec.shuffle_buffer, self.spec.shuffle_buffer, rng=rng)
            drawn = 0
            for sample in shuffle(s for piece in pieces for s in piece):
                drawn += 1
                yield sample
            if drawn == 0:  # every shard of this stream was skipped: never spin forever
                raise DataError(f"data stream {slot} found no readable samples in epoch "
                                f"{epoch}; every shard it reads was bad")
            epoch += 1

    def _guarded(self, shard: ShardInfo, lo: int, hi: int) -> Iterator[Sample]:
        try:
            yield from _shard_samples(shard.url, lo, hi, self.spec)
        except Exception as e:  # tar, npy or meta errors all mean a bad shard
            error = e if isinstance(e, DataError) else DataError(
                f"shard {shard.url} is corrupt or unreadable ({type(e).__name__}: {e}); re-run "
                "prep, or set data.on_error=skip to skip bad shards")
            if self.spec.on_error != "skip":
                raise error from e
            self.skipped_shards += 1
            warnings.warn(f"skipping bad shard: {error}", stacklevel=2)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = self.spec.num_workers
        # A fresh DataLoader starts its round-robin at worker 0, but batch number
        # ``start_batches`` belongs to stream ``start_batches % workers``: rotate.
        worker = ((info.id if info else 0) + self.start_batches) % workers
        slot = self.spec.dp_rank * workers + worker
        # Batches this stream produced before the resume point.
        skip = max(0, self.start_batches - worker + workers - 1) // workers
        samples = self._samples(slot)
        mb = self.spec.micro_batch_size
        for _ in range(skip * mb):
            next(samples)
        while True:
            tokens, masks = zip(*(next(samples) for _ in range(mb)))
            batch = {"tokens": torch.from_numpy(np.stack(tokens).astype(np.int64)),
                     "skipped_shards": self.skipped_shards}
            if self.spec.loss_mask:
                batch["loss_mask"] = torch.from_numpy(np.stack(masks).astype(np.float32))
            yield batch


class ResumableLoader:
    """Iterator of batches ({"tokens"[, "loss_mask"]}) whose position (``state_dict``) goes
    into checkpoints."""

    def __init__(self, spec: StreamSpec, start_batches: int = 0) -> None:
        streams = spec.dp_size * spec.num_workers
        if spec.total_samples < streams:
            raise DataError(
                f"{spec.total_samples} samples cannot feed {streams} streams (data-parallel "
                "ranks × data.num_workers); lower data.num_workers or prepare more data")
        self.spec = spec
        self.batches = start_batches
        self._skipped = [0] * max(1, spec.num_workers)
        self._loader = DataLoader(
            TokenStream(spec, start_batches),
            batch_size=None,
            num_workers=spec.num_workers if spec.num_workers > 1 else 0,
            persistent_workers=False,
            prefetch_factor=2 if spec.num_workers > 1 else None,
            multiprocessing_context=WORKER_CONTEXT if spec.num_workers > 1 else None,
        )
        self._it = iter(self._loader)

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        item = next(self._it)
        # Round-robin: batch b came from worker b % num_workers.
        self._skipped[self.batches % len(self._skipped)] = int(item.pop("skipped_shards"))
        self.batches += 1
        return item

    @property
    def skipped_shards(self) -> int:
        """Bad shards skipped so far (``data.on_error=skip``), summed over workers."""
        return sum(self._skipped)

    @property
    def epoch(self) -> float:
        seen = self.batches * self.spec.micro_batch_size * self.spec.dp_size
        return seen / self.spec.total_samples

    def state_dict(self) -> dict:
        s = self.spec
        return {"batches": self.batches, "num_workers": s.num_workers, "dp_size": s.dp_size,
                "micro_batch_size": s.micro_batch_size, "seed": s.seed}

    @staticmethod
    def check_state(state: dict, spec: StreamSpec) -> int:
        """Batches to skip on resume; refuses a layout under which replay would differ."""
        for key in ("num_workers", "dp_size", "micro_batch_size", "seed"):
            if state[key] != getattr(spec, key):
                raise DataError(
                    f"checkpoint's data stream used {key}={state[key]} but this run has "
                    f"{getattr(spec, key)}; resume with the same setting to continue exactly"
                )
        return state["batches"]


def ordered_samples(spec: StreamSpec) -> Iterator[Sample]:
    """Every sample of ``spec``'s shards once, in order (evaluation)."""
    for shard in spec.shards:
        yield from _shard_samples(shard.url, 0, shard.samples, spec)


def sequential_windows(spec: StreamSpec, length: int) -> Iterator[torch.Tensor]:
    """Consecutive windows of ``length`` tokens from a split read in order.

    Packed samples are contiguous, non-overlapping slices of the split's token stream, so
    concatenating them gives windows longer than the training length (for extrapolation).
    """
    buf = np.empty(0, dtype=np.int64)
    for sample, _ in ordered_samples(spec):
        buf = np.concatenate([buf, sample.astype(np.int64)])
        while len(buf) >= length:
            yield torch.from_numpy(buf[:length].copy())
            buf = buf[length:]
