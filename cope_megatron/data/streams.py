"""The data order: a fixed number of virtual streams, read at any position in O(1).

Each epoch, the shards are put in a seeded order and the concatenated sample sequence is
cut into ``V`` contiguous, near-equal ranges, one per virtual stream: every sample is seen
once per epoch, and a stream reads only the shards its range touches. A stream shuffles
its range in blocks of ``shuffle_buffer`` samples, each by its own seeded permutation, and
runs on into the next epoch. Global batch k takes samples [k·G/V, (k+1)·G/V) of every
stream, so it is the same set of samples whatever the data-parallel size, micro batch ×
accumulation split and worker count (which only decide who reads which stream), and
position k·G/V of a stream is found without reading what came before: resuming re-reads
at most one block, never a replay from the start. Written by hand: WebDataset shuffles
through a buffer whose state cannot be sought, and torch's samplers need random access
to samples, which tar shards do not give.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator

from cope_megatron.data.source import (
    DataError,
    Sample,
    ShardInfo,
    StreamSpec,
    shard_samples,
)


def stream_pieces(spec: StreamSpec, epoch: int, stream: int) -> list[tuple[ShardInfo, int, int]]:
    """(shard, first sample, end sample) pieces covering ``stream``'s range in ``epoch``."""
    order = list(spec.shards)
    random.Random(f"{spec.seed}:shards:{epoch}").shuffle(order)
    lo, hi = stream_bounds(spec, stream)
    pieces, start = [], 0
    for shard in order:
        end = start + shard.samples
        if end > lo and start < hi:
            pieces.append((shard, max(lo, start) - start, min(hi, end) - start))
        start = end
    return pieces


def stream_bounds(spec: StreamSpec, stream: int) -> tuple[int, int]:
    total, streams = spec.total_samples, spec.num_streams
    return stream * total // streams, (stream + 1) * total // streams


class StreamReader:
    """The samples of one virtual stream from a position on, endlessly; counts the bad
    shards it skipped (``on_error=skip``: a skipped shard's samples are simply missing)."""

    def __init__(self, spec: StreamSpec, stream: int, start: int) -> None:
        self.spec, self.stream, self.start = spec, stream, start
        self.skipped_shards = 0

    def __iter__(self) -> Iterator[Sample]:
        lo, hi = stream_bounds(self.spec, self.stream)
        length, size = hi - lo, self.spec.shuffle_buffer
        epoch, offset = divmod(self.start, length)
        while True:
            first_block = offset // size
            samples = self._range(epoch, first_block * size)
            drawn = 0
            for block in range(first_block, -(-length // size)):
                items = [next(samples, None) for _ in range(min(size, length - block * size))]
                items = [s for s in items if s is not None]
                order = list(range(len(items)))
                random.Random(f"{self.spec.seed}:block:{epoch}:{self.stream}:{block}"
                              ).shuffle(order)
                skip = offset - block * size if block == first_block else 0
                for i in order[skip:]:
                    drawn += 1
                    yield items[i]
            if drawn == 0 and offset == 0:  # never spin on a stream whose shards are all bad
                raise DataError(f"data stream {self.stream} found no readable samples in "
                                f"epoch {epoch}; every shard it reads was bad")
            epoch, offset = epoch + 1, 0

    def _range(self, epoch: int, offset: int) -> Iterator[Sample]:
        """The stream's samples in range order from ``offset`` (one pass over its shards)."""
        start = 0
        for shard, lo, hi in stream_pieces(self.spec, epoch, self.stream):
            if start + hi - lo > offset:
                yield from self._guarded(shard, lo + max(0, offset - start), hi)
            start += hi - lo

    def _guarded(self, shard: ShardInfo, lo: int, hi: int) -> Iterator[Sample]:
        try:
            yield from shard_samples(shard, lo, hi, self.spec)
        except Exception as e:  # tar, npy or meta errors all mean a bad shard
            error = e if isinstance(e, DataError) else DataError(
                f"shard {shard.url} is corrupt or unreadable ({type(e).__name__}: {e}); re-run "
                "prep, or set data.on_error=skip to skip bad shards")
            if self.spec.on_error != "skip":
                raise error from e
            self.skipped_shards += 1
            warnings.warn(f"skipping bad shard: {error}", stacklevel=2)
