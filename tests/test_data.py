"""Data pipeline: lossless round trip, coverage across data-parallel ranks, exact resume
with several workers, and one clear error per kind of bad input."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cope_megatron.data.corpus import PrepError
from cope_megatron.data.format import DataError, read_manifest
from cope_megatron.data.loader import ResumableLoader
from cope_megatron.data.prep.prep import is_validation, prepare
from cope_megatron.data.source import StreamSpec, ordered_samples, split_shards
from cope_megatron.data.streams import StreamReader, stream_bounds
from cope_megatron.data.tokenizer import load_tokenizer
from tests.helpers import small_data


def make_spec(shard_dir, split="train", **kw) -> StreamSpec:
    m = read_manifest(shard_dir)
    return StreamSpec(shards=split_shards(shard_dir, m, split), seq_len=m["seq_len"],
                      dtype=m["dtype"], tokenizer_sha256=m["tokenizer_sha256"],
                      **{"seed": 3, "micro_batch_size": 1, "shuffle_buffer": 16, **kw})


def split_stream(shard_dir, split) -> np.ndarray:
    spec = make_spec(shard_dir, split)
    return np.concatenate([s for s, _ in ordered_samples(spec)])


def test_round_trip_reproduces_documents(prepared):
    """Each file's tokens (here one document a file) are packed in file order, the last
    partial sample of each file after all files (so that prep in parts packs alike)."""
    shards, manifest, corpus = prepared
    sp = load_tokenizer(shards / "tokenizer.model")
    assert manifest["dtype"] == "uint16" and len(manifest["splits"]["train"]["shards"]) > 2
    length = manifest["seq_len"] + 1
    for split in ("train", "val"):
        docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))
                if is_validation(str(p), 7, 0.25) == (split == "val")]
        ids = [sp.encode(doc) + [manifest["eos_id"]] for doc in docs]
        assert all(sp.decode(i[:-1]) == doc for i, doc in zip(ids, docs))
        cut = [len(i) // length * length for i in ids]
        want = [t for i, c in zip(ids, cut) for t in i[:c]] + [
            t for i, c in zip(ids, cut) for t in i[c:]]
        assert split_stream(shards, split).tolist() == want[:len(want) // length * length]


@pytest.mark.parametrize("streams, block", [(1, 16), (4, 5), (6, 1000)])
def test_each_epoch_covers_every_sample_once_across_streams(prepared, streams, block):
    """Every stream takes a near-equal share; together, each epoch is every sample exactly
    once, in a different order per epoch."""
    shards, manifest, _ = prepared
    total = manifest["splits"]["train"]["samples"]
    everything = {s.tobytes() for s in split_stream(shards, "train").reshape(total, -1)}
    assert len(everything) == total
    spec = make_spec(shards, streams=streams, shuffle_buffer=block)
    epochs = [Counter(), Counter()]
    first = []
    for stream in range(streams):
        lo, hi = stream_bounds(spec, stream)
        assert hi - lo in (total // streams, -(-total // streams))
        drawn = iter(StreamReader(spec, stream, 0))
        for epoch in epochs:
            samples = [next(drawn)[0].tobytes() for _ in range(hi - lo)]
            epoch.update(samples)
            if stream == 0:
                first.append(samples)
    for epoch in epochs:
        assert set(epoch) == everything and max(epoch.values()) == 1
    assert first[0] != first[1]


@pytest.mark.parametrize("start", [0, 3, 17, 60, 250])
def test_a_stream_read_from_any_position_continues_it_exactly(prepared, start):
    shards, _, _ = prepared
    spec = make_spec(shards, streams=3, shuffle_buffer=7)
    whole = iter(StreamReader(spec, 1, 0))
    want = [next(whole)[0].tobytes() for _ in range(start + 30)][start:]
    sought = iter(StreamReader(spec, 1, start))
    assert [next(sought)[0].tobytes() for _ in range(30)] == want


def test_different_ranks_see_different_samples_and_order_depends_on_seed(prepared):
    shards, _, _ = prepared
    a = [next(it)["tokens"][0].sum().item() for it in [ResumableLoader(make_spec(shards))]
         for _ in range(6)]
    b = [next(it)["tokens"][0].sum().item() for it in [ResumableLoader(make_spec(shards, seed=4))]
         for _ in range(6)]
    again = [next(it)["tokens"][0].sum().item() for it in [ResumableLoader(make_spec(shards))]
             for _ in range(6)]
    assert a == again and a != b


def global_batches(shards, steps, *, dp_size, micro, accum, workers, start=0):
    """The samples (as bytes) of each global batch, gathered over ranks."""
    loaders = [ResumableLoader(make_spec(shards, dp_rank=r, dp_size=dp_size, num_workers=workers,
                                         micro_batch_size=micro, grad_accum=accum, streams=4,
                                         shuffle_buffer=5), start) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        batch = Counter()
        for loader in loaders:
            for _ in range(accum):
                micro_batch = next(loader)["tokens"]
                assert micro_batch.shape[0] == micro
                batch.update(row.numpy().tobytes() for row in micro_batch)
        out.append(batch)
    return out


def test_global_batches_are_the_same_for_every_layout(prepared):
    """Global batch 8 over 4 streams: one process with 8 × 1, or 4 × 2, or 2 × 4 micro
    batches, two ranks with 2 workers, four ranks: the same samples every step."""
    shards, _, _ = prepared
    want = global_batches(shards, 5, dp_size=1, micro=8, accum=1, workers=1)
    assert all(sum(b.values()) == 8 for b in want) and want[0] != want[1]
    for layout in [dict(dp_size=1, micro=4, accum=2, workers=2),
                   dict(dp_size=2, micro=2, accum=2, workers=2),
                   dict(dp_size=4, micro=1, accum=2, workers=1)]:
        assert global_batches(shards, 5, **layout) == want, layout


@pytest.mark.parametrize("workers, stop", [(2, 5), (1, 7), (2, 40)])
def test_resume_mid_epoch_with_workers_is_exact(prepared, workers, stop):
    """From its step count alone a loader continues on the same layout or another."""
    shards, _, _ = prepared
    layout = dict(dp_size=2, micro=2, accum=2, workers=workers)
    want = global_batches(shards, stop + 4, **layout)[stop:]
    assert global_batches(shards, 4, **layout, start=stop) == want
    assert global_batches(shards, 4, dp_size=1, micro=4, accum=2, workers=1,
                          start=stop) == want


def test_resume_decodes_at_most_one_block_per_stream(prepared, monkeypatch):
    """Reaching step 200 decodes at most one shuffle block per stream before its first
    batch, as at step 2 (the old loader replayed every sample since step 0: 800 here)."""
    from cope_megatron.data import source

    shards, _, _ = prepared
    spec = make_spec(shards, micro_batch_size=4, streams=4, shuffle_buffer=8)
    decoded = []
    check_ids = source._check_ids
    monkeypatch.setattr(source, "_check_ids", lambda *a: (decoded.append(a[1]), check_ids(*a)))
    for start in (2, 200):
        decoded.clear()
        next(ResumableLoader(spec, start))
        assert 0 < len(decoded) <= spec.num_streams * spec.shuffle_buffer, start


def test_pipe_urls_stream_like_local_files(prepared, tmp_path):
    """Shards behind a command (object stores: ``pipe:aws s3 cp s3://... -``) read the same."""
    dst = copy_shards(prepared, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["url_prefix"] = f"pipe:cat {dst}/"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    spec = make_spec(dst)
    assert spec.shards[0].url.startswith("pipe:cat ")
    local = ResumableLoader(make_spec(prepared[0]))
    piped = ResumableLoader(spec)
    for _ in range(40):
        assert np.array_equal(next(local)["tokens"].numpy(), next(piped)["tokens"].numpy())


def test_resume_with_another_data_order_is_refused(prepared):
    shards, _, _ = prepared
    state = ResumableLoader(make_spec(shards, micro_batch_size=4, streams=2)).state_dict()
    assert ResumableLoader.check_state(state, make_spec(shards, dp_size=2, micro_batch_size=2,
                                                        streams=2)) == 0
    with pytest.raises(DataError, match="global_batch"):
        ResumableLoader.check_state(state, make_spec(shards, micro_batch_size=2, streams=2))
    with pytest.raises(DataError, match="streams"):
        ResumableLoader.check_state(state, make_spec(shards, micro_batch_size=4, streams=4))


@pytest.mark.parametrize("kw, key", [(dict(micro_batch_size=3, streams=2), "data.streams"),
                                     (dict(dp_size=2, streams=3, micro_batch_size=3),
                                      "data.streams"),
                                     (dict(num_workers=3, streams=2, micro_batch_size=2),
                                      "data.num_workers")])
def test_impossible_stream_layouts_name_the_key(prepared, kw, key):
    shards, _, _ = prepared
    with pytest.raises(DataError, match=f"^{key}:"):
        ResumableLoader(make_spec(shards, **kw))


def copy_shards(prepared, tmp_path) -> Path:
    shards, _, _ = prepared
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


def drain(spec, n=None):
    """Draw a whole epoch (or ``n`` batches)."""
    loader = ResumableLoader(spec)
    n = spec.total_samples if n is None else n
    return [next(loader) for _ in range(n)], loader


def test_truncated_shard_names_the_shard(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    victim = dst / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    with pytest.raises(DataError, match="train-000001.tar"):
        drain(make_spec(dst))


def test_corrupt_shard_names_the_shard_and_skip_counts_it(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    victim = dst / "train-000002.tar"
    victim.write_bytes(b"\x00garbage" * 3000)
    with pytest.raises(DataError, match=r"train-000002.tar.*on_error=skip"):
        drain(make_spec(dst))
    with pytest.warns(UserWarning, match="train-000002.tar"):
        _, loader = drain(make_spec(dst, on_error="skip"))
    assert loader.skipped_shards >= 1


@pytest.mark.parametrize("key, value", [("tokenizer_sha256", "0" * 64), ("seq_len", 16),
                                        ("dtype", "uint32")])
def test_shard_from_another_prep_is_rejected(prepared, tmp_path, key, value):
    dst = copy_shards(prepared, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest[key] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"shard .*train-\d+\.tar: {key} is"):
        drain(make_spec(dst), 2)


def test_unigram_tokenizer_keeps_user_symbols(prepared, tmp_path):
    from cope_megatron.data.tokenizer import load_tokenizer, train_tokenizer

    _, _, corpus = prepared
    path = train_tokenizer(sorted(corpus.glob("*.txt")), tmp_path, vocab_size=400,
                           model_type="unigram", byte_fallback=True, user_symbols=["<sep>"],
                           sample_bytes=200_000, text_field="text")
    sp = load_tokenizer(path)
    ids = sp.encode("the world<sep>of men")
    assert sp.token_id("<sep>") in ids
    assert sp.decode(ids) == "the world<sep>of men"


def test_shard_without_header_is_rejected(prepared, tmp_path):
    import webdataset as wds

    from cope_megatron.data.prep.shards import encode_tokens

    dst = copy_shards(prepared, tmp_path)
    with wds.TarWriter(str(dst / "train-000000.tar")) as tar:
        for i in range(17):
            tar.write({"__key__": f"x{i}", "tokens.npy": encode_tokens(np.zeros(33, np.uint16))})
    with pytest.raises(DataError, match=r"train-000000.tar has no __shard__ header"):
        drain(make_spec(dst, verify="off"))  # the digest check would catch it first


def test_more_streams_than_samples_is_refused(prepared):
    shards, manifest, _ = prepared
    total = manifest["splits"]["train"]["samples"]
    with pytest.raises(DataError, match="cannot feed"):
        ResumableLoader(make_spec(shards, micro_batch_size=total + 1, streams=total + 1))


def test_all_shards_bad_with_skip_stops_instead_of_spinning(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    for shard in dst.glob("train-*.tar"):
        shard.write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no readable samples"):
        drain(make_spec(dst, on_error="skip"), 1)


def test_empty_dataset_and_missing_manifest(prepared, tmp_path):
    with pytest.raises(DataError, match="cope-megatron prep"):
        read_manifest(tmp_path)
    dst = copy_shards(prepared, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = []
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no samples"):
        make_spec(dst)


def test_prep_resumes_keeping_finished_shards(prepared, tmp_path):
    shards, manifest, corpus = prepared
    data = small_data(corpus.parent, shards=str(tmp_path / "p"), prep_workers=1,
                      tokenizer=str(shards / "tokenizer.model"))
    first = prepare(data, seq_len=32, seed=7, progress=False)
    out = tmp_path / "p"
    # Simulate a crash after two shards: no manifest, later shards missing, one partial.
    (out / "manifest.json").unlink()
    for p in sorted(out.glob("train-*.tar"))[2:]:
        p.unlink()
    (out / "train-000002.tar.tmp").write_bytes(b"partial")
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    second = prepare(data, seq_len=32, seed=7, progress=False)
    assert second["splits"] == first["splits"]
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept
    assert not list(out.glob("*.tmp"))


def test_prep_refuses_a_directory_prepared_from_other_inputs(prepared, tmp_path):
    shards, _, corpus = prepared
    data = small_data(corpus.parent, shards=str(tmp_path / "p"), prep_workers=1,
                      tokenizer=str(shards / "tokenizer.model"))
    prepare(data, seq_len=32, seed=7, progress=False)
    assert prepare(data, seq_len=32, seed=7, progress=False)  # same inputs: reused
    with pytest.raises(PrepError, match=r"other inputs \(changed: \['seq_len'\]\)"):
        prepare(data, seq_len=64, seed=7, progress=False)
    (corpus.parent / "extra").mkdir(exist_ok=True)
    (corpus.parent / "extra" / "more.txt").write_text("more text\n")
    more = small_data(corpus.parent, shards=str(tmp_path / "p"), prep_workers=1,
                      corpus=[str(corpus), str(corpus.parent / "extra")],
                      tokenizer=str(shards / "tokenizer.model"))
    with pytest.raises(PrepError, match=r"changed: \['files'\]"):
        prepare(more, seq_len=32, seed=7, progress=False)


def test_missing_corpus_path_is_named(tmp_path):
    from cope_megatron.data.corpus import CorpusError

    with pytest.raises(CorpusError, match="no/such/dir"):
        prepare(small_data(tmp_path, corpus=[str(tmp_path / "no/such/dir")]), seq_len=32,
                seed=1, progress=False)


def test_jsonl_and_compressed_inputs(tmp_path):
    import gzip

    import zstandard

    from cope_megatron.data.corpus import iter_pieces

    rows = [{"text": f"document number {i}\nwith two lines"} for i in range(3)]
    jsonl = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"plain text\n"))
    docs = [p.text for p in iter_pieces(tmp_path / "a.jsonl.gz")]
    assert docs == [r["text"] for r in rows]
    assert [p.text for p in iter_pieces(tmp_path / "b.txt.zst")] == ["plain text\n"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    from cope_megatron.data.corpus import CorpusError

    with pytest.raises(CorpusError, match="bad.jsonl:1"):
        list(iter_pieces(tmp_path / "bad.jsonl"))
