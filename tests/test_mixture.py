"""Weighted data mixtures (issue 33, item 3): realized proportions against the weights, a
small source repeating and a large one cut, the same global batches at every layout and
after a resume, a training run resumed mid-mixture bit for bit, validation perplexity per
source, and one clear error per bad mixture."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest

from cope_megatron.config import ConfigError, MixtureSource, load_config, validate
from cope_megatron.data.format import DataError, read_manifest
from cope_megatron.data.loader import ResumableLoader
from cope_megatron.data.mixture import MixedStreamReader, Schedule, check_sources, mixture_of
from cope_megatron.data.prep.prep import prepare
from cope_megatron.data.source import ordered_samples, split_spec
from cope_megatron.data.streams import stream_bounds
from cope_megatron.report.runs import group, load_run
from cope_megatron.report.tables import source_table
from cope_megatron.startup import check
from cope_megatron.train import run_train
from tests.helpers import (
    debug_overrides,
    losses,
    small_data,
    train_here,
    train_losses,
    write_corpus,
)

WEIGHTS = (0.75, 0.25)


@pytest.fixture(scope="module")
def sources(prepared, tmp_path_factory) -> list[MixtureSource]:
    """The session data set ("big") and a small one prepared with its tokenizer ("small",
    about a twentieth of its samples)."""
    big = prepared[0]
    root = tmp_path_factory.mktemp("small")
    write_corpus(root / "corpus", docs=4, words_per_doc=400, seed=5)
    prepare(small_data(root, tokenizer=str(big / "tokenizer.model"), val_fraction=0.5),
            seq_len=32, seed=7, progress=False)
    return [MixtureSource(shards=str(big), weight=WEIGHTS[0], name="big"),
            MixtureSource(shards=str(root / "shards"), weight=WEIGHTS[1], name="small")]


def flow(entries: list[MixtureSource]) -> str:
    """``data.mixture`` as a YAML override."""
    return "[" + ", ".join(f"{{shards: '{e.shards}', weight: {e.weight}"
                           + (f", name: {e.name}}}" if e.name else "}") for e in entries) + "]"


def train_samples(entry: MixtureSource) -> set[bytes]:
    spec = split_spec(entry.shards, read_manifest(entry.shards), "train")
    return {tokens.astype("int64").tobytes() for tokens, _ in ordered_samples(spec)}


def loaders(entries, *, dp_size, micro, accum, workers=1, start=0, seed=3, streams=4):
    spec0 = split_spec(entries[0].shards, read_manifest(entries[0].shards), "train",
                       seed=seed, dp_size=dp_size, micro_batch_size=micro, grad_accum=accum,
                       num_workers=workers, streams=streams, shuffle_buffer=5)
    from dataclasses import replace

    return [ResumableLoader(replace(spec0, dp_rank=r), start, mixture_of(entries))
            for r in range(dp_size)]


def global_batches(entries, steps, **layout) -> list[Counter]:
    """The samples (as bytes) of each global batch, gathered over ranks."""
    ranks = loaders(entries, **layout)
    out = []
    for _ in range(steps):
        batch = Counter()
        for loader in ranks:
            for _ in range(layout["accum"]):
                batch.update(row.numpy().tobytes() for row in next(loader)["tokens"])
        out.append(batch)
    for loader in ranks:
        loader.close()
    return out


def test_schedule_tracks_the_weights_and_seeks_exactly():
    """Any n samples hold n·w ± 2 of each source (independent draws: ± 3σ = 3√(n·w(1−w)),
    which is also asserted); a stream's per-source counts at any position, computed in
    O(log), are those of the schedule walked sample by sample."""
    weights = (0.6, 0.3, 0.1)
    schedule = Schedule.of(weights, seed=11)
    drawn = [schedule.source(g) for g in range(20_000)]
    for n in (64, 1000, 20_000):
        for s, w in enumerate(weights):
            got = drawn[:n].count(s)
            assert abs(got - n * w) <= min(2, 3 * math.sqrt(n * w * (1 - w))), (n, s, got)
    for k in range(0, 20_000 - 64, 64):  # every global batch of 64
        batch = drawn[k:k + 64]
        assert all(abs(batch.count(s) - 64 * w) <= 2 for s, w in enumerate(weights))
    assert schedule.counts(20_000) == [drawn.count(s) for s in range(3)]
    for stream, streams, position in [(0, 4, 777), (3, 4, 1234), (5, 64, 300)]:
        walked = [drawn[p * streams + stream] for p in range(position)]
        assert schedule.counts(position, stream, streams) == [walked.count(s) for s in range(3)]
    assert Schedule.of(weights, seed=12).source(0) != schedule.source(0) or \
        [Schedule.of(weights, seed=12).source(g) for g in range(20)] != drawn[:20]


def test_loader_draws_each_source_as_scheduled_small_repeats_big_is_cut(sources):
    """The loader's samples come from the sources in the schedule's proportions; over the
    steps read, the small source repeats (each stream's second pass is the same samples,
    reshuffled) while the big one never repeats a sample."""
    big, small = (train_samples(e) for e in sources)
    assert not big & small and len(small) * 6 < len(big)
    steps, batch = 48, 8
    [loader] = loaders(sources, dp_size=1, micro=batch, accum=1)
    rows = [row.numpy().tobytes() for _ in range(steps) for row in next(loader)["tokens"]]
    loader.close()
    from_small = [r for r in rows if r in small]
    assert len(from_small) + sum(r in big for r in rows) == len(rows)
    assert abs(len(from_small) - WEIGHTS[1] * len(rows)) <= 2  # tighter than sampling error
    assert len(from_small) > 2 * len(small) and set(from_small) == small  # repeats
    assert max(Counter(r for r in rows if r in big).values()) == 1  # cut, never repeated
    # Per stream: its first pass over its share of the small source, then its second;
    # over the streams, each pass is every small sample once, in a new order.
    mixture = mixture_of(sources)
    epochs: list[list[bytes]] = [[], []]
    for stream in range(loader.spec.num_streams):
        lo, hi = stream_bounds(mixture.specs(loader.spec)[1], stream)
        reader = iter(MixedStreamReader(loader.spec, mixture, stream, 0))
        drawn = [row for row in (next(reader)[0].astype("int64").tobytes()
                                 for _ in range(12 * (hi - lo))) if row in small]
        epochs[0] += drawn[:hi - lo]
        epochs[1] += drawn[hi - lo:2 * (hi - lo)]
    for epoch in epochs:
        assert Counter(epoch) == Counter(small)
    assert epochs[0] != epochs[1]


def test_global_batches_are_the_same_at_every_layout_and_after_resume(sources):
    want = global_batches(sources, 9, dp_size=1, micro=8, accum=1)
    assert want[0] != want[1]
    for layout in [dict(dp_size=2, micro=2, accum=2, workers=2),
                   dict(dp_size=4, micro=1, accum=2)]:
        assert global_batches(sources, 9, **layout) == want, layout
    for start in (3, 7):  # a resume from the step count, on the same layout or another
        assert global_batches(sources, 9 - start, dp_size=1, micro=8, accum=1,
                              start=start) == want[start:]
        assert global_batches(sources, 9 - start, dp_size=2, micro=2, accum=2,
                              start=start) == want[start:]


def test_loader_state_records_each_sources_position_and_refuses_another_mixture(sources):
    [loader] = loaders(sources, dp_size=1, micro=8, accum=1)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    loader.close()
    assert state["source_samples"] == dict(zip(["big", "small"],
                                               Schedule.of(WEIGHTS, 3).counts(40)))
    assert sum(state["source_samples"].values()) == 40
    assert ResumableLoader.check_state(state, loader.spec, mixture_of(sources)) == 5
    scaled = [MixtureSource(shards=s.shards, weight=3 * s.weight, name=s.name)
              for s in sources]  # the same shares: the same order
    assert ResumableLoader.check_state(state, loader.spec, mixture_of(scaled)) == 5
    other = [sources[0], MixtureSource(shards=sources[1].shards, weight=0.5, name="small")]
    with pytest.raises(DataError, match="mixture_shares"):
        ResumableLoader.check_state(state, loader.spec, mixture_of(other))
    with pytest.raises(DataError, match="mixture_shares"):  # a single-source checkpoint
        ResumableLoader.check_state({**state, "mixture_shares": None}, loader.spec,
                                    mixture_of(sources))
    moved = {**state, "source_samples": {"big": 39, "small": 1}}
    with pytest.raises(DataError, match="mixture schedule draws"):
        ResumableLoader.check_state(moved, loader.spec, mixture_of(sources))


def test_training_resumes_mid_mixture_exactly_and_eval_scores_each_source(
        sources, tmp_path, dist_cleanup):
    """6 steps straight (then evaluated) == 3 steps, stopped, then 3 more, bit for bit; a
    changed weight is refused on resume, naming the mixture."""
    mix = {"data.mixture": flow(sources), "data.streams": 2, "data.shuffle_buffer": 8,
           "eval.length_multipliers": "[1]", "eval.passkey_samples": 0, "eval.tokens": 128}
    straight, report = run_train(load_config(debug_overrides(
        sources[0].shards, tmp_path / "a", **mix)))
    from cope_megatron.distributed.parallel import destroy_distributed

    destroy_distributed()
    run = tmp_path / "b"
    train_here(sources[0].shards, run, **mix, **{"train.steps": 3})
    changed = [sources[0], MixtureSource(shards=sources[1].shards, weight=0.5, name="small")]
    with pytest.raises(ConfigError, match=r"data\.mixture_sources: the checkpoint"):
        train_here(sources[0].shards, run, **{**mix, "data.mixture": flow(changed)})
    resumed = train_here(sources[0].shards, run, **mix)
    assert resumed.losses == straight.losses[3:]
    assert losses(run) == straight.losses
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]["source_epochs"]) == {"big", "small"}

    per_source = report["mixture"]
    at_train_length = report["lengths"][32]  # the first source's val split, same tokens
    assert per_source["sources"]["big"]["loss"] == at_train_length["loss"]
    assert {s["weight"] for s in per_source["sources"].values()} == set(WEIGHTS)
    assert per_source["total"]["loss"] == pytest.approx(
        sum(s["loss"] * s["weight"] for s in per_source["sources"].values()))
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["mixture"]["total"]
    table = source_table(group([load_run(tmp_path / "a")]))
    assert "| big | small | total (weighted) |" in table


def base(sources, **changes):
    return load_config([f"data.mixture={flow(sources)}", "model.seq_length=32",
                        *(f"{k}={v}" for k, v in changes.items())])


@pytest.mark.parametrize("entries, match", [
    ([("web", 1.0), ("small", 0.0)], r"data\.mixture\[1\] \(small\): weight"),
    ([("small", 1.0), ("small", 2.0)], r"data\.mixture\[1\] \(small\): another source"),
])
def test_bad_weights_and_names_are_refused_naming_the_entry(sources, entries, match):
    mixture = [MixtureSource(shards=sources[1].shards, weight=w, name=n) for n, w in entries]
    with pytest.raises(ConfigError, match=match):
        validate(base(mixture))


def test_a_run_wide_url_prefix_is_refused_beside_a_mixture(sources):
    with pytest.raises(ConfigError, match=r"^data\.url_prefix: with data\.mixture"):
        validate(base(sources, **{"data.url_prefix": "https://host/dir/"}))


def test_bad_sources_are_refused_naming_the_entry(sources, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.shards: .*first source"):
        validate(base(sources, **{"data.shards": "elsewhere"}))
    missing = [*sources, MixtureSource(shards=str(tmp_path / "none"), weight=1.0)]
    with pytest.raises(ConfigError, match=r"data\.mixture\[2\] \(none\): no manifest"):
        check(base(missing, **{"run.dir": str(tmp_path / "run")}), 1)
    other = tmp_path / "other"
    shutil.copytree(sources[1].shards, other)
    manifest = read_manifest(other)
    (other / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 1024}))
    foreign = [*sources, MixtureSource(shards=str(other), weight=1.0)]
    with pytest.raises(ConfigError, match=r"data\.mixture\[2\] \(other\): its vocab_size is "
                                          r"1024 but the first source's \(big\) is 512"):
        check_sources(foreign)
    streams = len(train_samples(sources[1])) + 1  # more than the small source has
    with pytest.raises(DataError, match=f"source small has .* too few for {streams} data "):
        loaders(sources, dp_size=1, micro=streams, accum=1, streams=streams)


def test_data_parallel_mixture_matches_one_process_and_resumes_there(sources, tmp_path):
    """Global batch 4 from the mixture: DP=2 (micro 2) gives one process's losses (2 × 2
    accumulation), and a DP=2 run stopped after 3 steps continues in one process."""
    mix = {"data.mixture": flow(sources), "train.micro_batch_size": 2,
           "data.shuffle_buffer": 8}
    one = {**mix, "train.grad_accum": 2}
    want = train_losses(sources[0].shards, tmp_path / "one", 1, 6, **one)
    dp2 = train_losses(sources[0].shards, tmp_path / "dp2", 2, 3, **mix)
    resumed = train_losses(sources[0].shards, tmp_path / "dp2", 1, 6, **one)
    assert len(dp2) == 3 and len(resumed) == 6
    assert all(abs(a - b) < 1e-5 for a, b in zip(resumed, want)), (resumed, want)
