"""Pack token streams into fixed-length samples and write them as WebDataset tar shards.

Each shard opens with a ``__shard__`` record (seq_len, dtype, tokenizer hash) so a reader
can reject a shard that does not belong to the manifest. Shards are written to a
temporary name and renamed when complete: a file with the final name is always whole,
which is what lets an interrupted prep keep its finished shards.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from cope_megatron.data.format import SHARD_META_KEY, shard_entry


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} does not fit in 32 bits")


def encode_tokens(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


@dataclass
class SplitWriter:
    """Rotating shard writer for one split (``train`` or ``val``)."""

    out_dir: Path
    split: str
    meta: dict
    max_bytes: int
    shards: list[dict] = field(default_factory=list)
    """The manifest's entries of the finished shards (``format.shard_entry``)."""
    _tar: wds.TarWriter | None = None
    _tmp: Path | None = None
    _count: int = 0
    _bytes: int = 0
    _kept: bool = False
    _next_key: int = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        final = self.out_dir / name
        # A shard left whole by an earlier, interrupted run is kept; its samples are
        # recomputed (tokenization is deterministic) but not rewritten.
        self._kept = final.exists()
        self._tmp = Path(os.devnull) if self._kept else final.with_suffix(".tar.tmp")
        self._tar = wds.TarWriter(str(self._tmp), mtime=0)  # int: plain ustar headers, no PAX
        self._tar.write({"__key__": SHARD_META_KEY, "json": json.dumps(self.meta).encode()})
        self._count = self._bytes = 0

    def write(self, tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        """One sample: ``tokens`` [seq_len + 1] and, for data sets with a loss mask, one
        0/1 per prediction [seq_len]."""
        if self._tar is None:
            self._open()
        payload = encode_tokens(tokens)
        record = {"__key__": f"{self.split}{self._next_key:010d}", "tokens.npy": payload}
        if loss_mask is not None:
            record["mask.npy"] = encode_tokens(loss_mask.astype(np.uint8))
            payload += record["mask.npy"]
        self._tar.write(record)
        self._next_key += 1
        self._count += 1
        self._bytes += len(payload) + 1024  # tar header and padding
        if self._bytes >= self.max_bytes:
            self.close_shard()

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        final = self.out_dir / name
        if not self._kept:
            self._tmp.replace(final)
        self.shards.append(shard_entry(final, self._count))
        self._tar = None

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)


class Packer:
    """Cut a token stream into samples of exactly ``length`` tokens (seq_len + 1: inputs
    and shifted labels). Samples are contiguous and non-overlapping, so consecutive
    samples of a split concatenate back into its stream (used for long-context eval), but
    where prep ``cut`` the stream: at the end of each input file, whose last partial sample
    is packed after all files (``prep.encode_files``)."""

    def __init__(self, length: int, dtype: np.dtype, writer: SplitWriter) -> None:
        self.length, self.dtype, self.writer = length, dtype, writer
        self.buf = np.empty(0, dtype=dtype)
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, ids.astype(self.dtype)])
        n = len(self.buf) // self.length
        for i in range(n):
            self.writer.write(self.buf[i * self.length : (i + 1) * self.length])
        self.tokens += n * self.length
        self.buf = self.buf[n * self.length :]

    def cut(self) -> np.ndarray:
        """Take the tokens that fill no sample yet out of the stream (the next ``add``
        starts a sample)."""
        tail, self.buf = self.buf, np.empty(0, dtype=self.dtype)
        return tail

    def finish(self) -> int:
        """Close the last shard; returns the tokens dropped because they fill no sample."""
        self.writer.close_shard()
        return len(self.buf)
