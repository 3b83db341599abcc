"""Weighted mixtures of prepared shard sets (``data.mixture``): which source each sample of
the training order comes from, and the virtual streams that read them.

The schedule. Global sample g (global batch k holds g in [kG, (k+1)G)) comes from the
source whose share of [0, 1) holds u_g = frac(o + g·α): α the golden ratio's fractional
part, o an offset drawn from the seed. This Weyl sequence has discrepancy O(log n / n):
any n consecutive samples (a global batch, the first n of the run) hold n·w_s ± a few
samples of source s, far tighter than independent draws (± √(n·w_s)), and no source is
starved or bunched. u_g is kept in integers modulo 2^64, so the schedule is exact on every
machine, and how many of a stream's first p samples came from source s is a floor sum
(O(log) integer steps): a reader seeks to any position without replaying the schedule.

The sources. Each source has its own virtual streams (``streams``, the same count V as
the run) over its own shards, so it is read in its own seeded order. Mixture stream v
takes, at its position p (global sample p·V + v), the next sample of stream v of the
source the schedule names. Global batch k is thus the same samples at any DP/TP/CP layout
and worker count, and the loader's step count fixes every source's position (its state
records them, ``source_samples``).

Epochs are per source: a source drawn more often than it has samples repeats (its streams
run into a new epoch, reshuffled from the seed and the epoch number: another shard order,
other blocks); a source larger than its share is cut (the run ends inside its first epoch;
the rest is never read). Weights are never bent to fit a source's size.

Written by hand: WebDataset's ``RandomMix`` and torch's samplers draw the source from an
RNG whose state cannot be sought, so their order depends on the layout and cannot resume
from a step count.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from cope_megatron.config.schema import ConfigError, MixtureSource
from cope_megatron.data.format import has_manifest, identity, manifest_path, read_manifest
from cope_megatron.data.source import Sample, ShardInfo, StreamSpec, split_shards
from cope_megatron.data.streams import StreamReader

MODULUS = 1 << 64
STEP = 0x9E3779B97F4A7C15
"""⌊2^64/φ⌉, the golden ratio's fractional part α in 64-bit fixed point (Knuth's, as in
splitmix64); odd, so the sequence has full period."""
SAME = ("tokenizer_sha256", "vocab_size", "seq_len")
"""What every source must share with the first."""


def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """Σ_{i<n} ⌊(a·i + b) / m⌋ for a, b ≥ 0 (the Euclid-like reduction of AtCoder's
    ``floor_sum``), in exact integers."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b = divmod(y_max, m)
        m, a = a, m


def _below(n: int, start: int, step: int, bound: int) -> int:
    """#{i < n : (start + i·step) mod 2^64 < bound}: for x = start + i·step,
    ⌊(x + M − bound)/M⌋ − ⌊x/M⌋ is 1 when x mod M ≥ bound, else 0."""
    return (n + _floor_sum(n, MODULUS, step, start)
            - _floor_sum(n, MODULUS, step, start + MODULUS - bound))


@dataclass(frozen=True)
class Schedule:
    """Source s owns u in [bounds[s-1], bounds[s]) (scaled by 2^64)."""

    bounds: tuple[int, ...]
    offset: int

    @classmethod
    def of(cls, weights: tuple[float, ...], seed: int) -> Schedule:
        total = sum(Fraction(w) for w in weights)
        cumulative, bounds = Fraction(0), []
        for w in weights:
            cumulative += Fraction(w)
            bounds.append(math.floor(MODULUS * cumulative / total))
        digest = hashlib.sha256(f"{seed}:mixture".encode()).digest()
        return cls(tuple(bounds), int.from_bytes(digest[:8], "big"))

    def source(self, g: int) -> int:
        """The source of global sample ``g``."""
        return bisect.bisect_right(self.bounds, (self.offset + g * STEP) % MODULUS)

    def counts(self, n: int, stream: int = 0, streams: int = 1) -> list[int]:
        """Samples of each source among the first ``n`` of virtual stream ``stream`` of
        ``streams`` (global samples stream, stream + streams, ...); by default among the
        first ``n`` global samples."""
        start = (self.offset + stream * STEP) % MODULUS
        step = streams * STEP % MODULUS
        below = [0] + [_below(n, start, step, b) for b in self.bounds]
        return [hi - lo for lo, hi in zip(below, below[1:])]


def shares(weights) -> list[float]:
    """Each source's share of the samples: what the schedule depends on (weights 1, 1 and
    2, 2 draw the same order)."""
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class Mixture:
    """Each source's name, weight and training shards."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    shards: tuple[tuple[ShardInfo, ...], ...]

    def specs(self, spec: StreamSpec) -> list[StreamSpec]:
        """Each source's stream spec: ``spec``'s layout (the run's) on the source's shards."""
        return [dataclasses.replace(spec, shards=shards) for shards in self.shards]

    @property
    def shares(self) -> list[float]:
        return shares(self.weights)

    def schedule(self, seed: int) -> Schedule:
        return Schedule.of(self.weights, seed)


class MixedStreamReader:
    """The samples of one mixture stream from a position on, endlessly."""

    def __init__(self, spec: StreamSpec, mixture: Mixture, stream: int, start: int) -> None:
        self.spec, self.stream, self.start = spec, stream, start
        self.schedule = mixture.schedule(spec.seed)
        positions = self.schedule.counts(start, stream, spec.num_streams)
        self.readers = [StreamReader(s, stream, p)
                        for s, p in zip(mixture.specs(spec), positions)]

    @property
    def skipped_shards(self) -> int:
        return sum(r.skipped_shards for r in self.readers)

    def __iter__(self) -> Iterator[Sample]:
        sources = [iter(r) for r in self.readers]
        position, streams = self.start, self.spec.num_streams
        while True:
            yield next(sources[self.schedule.source(position * streams + self.stream)])
            position += 1


def check_sources(entries: list[MixtureSource]) -> list[dict]:
    """Every source's manifest, or one ConfigError naming the source: a missing data set,
    task data, or another tokenizer, vocabulary or sequence length than the first."""
    manifests = []
    for i, entry in enumerate(entries):
        where = f"data.mixture[{i}] ({entry.label})"
        if not has_manifest(entry.shards):
            raise ConfigError(f"{where}: no manifest at {manifest_path(entry.shards)}; run "
                              f"`cope-megatron prep` with data.shards={entry.shards} first")
        manifest = read_manifest(entry.shards)
        if "task" in manifest:
            raise ConfigError(f"{where}: {entry.shards} holds a synthetic task's data; a "
                              "mixture draws from language-model text only")
        first = manifests[0] if manifests else manifest
        for key in SAME:
            if manifest[key] != first[key]:
                raise ConfigError(
                    f"{where}: its {key} is {manifest[key]} but the first source's "
                    f"({entries[0].label}) is {first[key]}; every source must be prepared "
                    f"with one tokenizer and sequence length: re-run prep for it with "
                    f"data.tokenizer={entries[0].shards}/{first['tokenizer']} and the first "
                    f"source's seq_len ({first['seq_len']})")
        manifests.append(manifest)
    return manifests


def mixture_of(entries: list[MixtureSource], split: str = "train") -> Mixture:
    """The mixture of ``entries`` (checked by ``check_sources``), reading ``split``."""
    manifests = [read_manifest(e.shards) for e in entries]
    return Mixture(names=tuple(e.label for e in entries),
                   weights=tuple(e.weight for e in entries),
                   shards=tuple(split_shards(e.shards, m, split)
                                for e, m in zip(entries, manifests)))


def mixture_identity(entries: list[MixtureSource]) -> list[str]:
    """What a resume compares: each source's share of the samples and its shards'
    fingerprint, in order (the paths and names may change, as ``data.shards`` may)."""
    return [f"{share!r} × {identity(read_manifest(e.shards))['shards_fingerprint']}"
            for share, e in zip(shares([e.weight for e in entries]), entries)]
