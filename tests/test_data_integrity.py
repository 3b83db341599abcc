"""Shard integrity (issue 27): a shard changed, deleted or holding ids past the vocabulary
is named before its bytes are trained on, at start-up or on first read as data.verify
says, each shard hashed once per process; data.on_error=skip skips and counts it."""

import io
import json
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import webdataset as wds

from cope_megatron.config import load_config
from cope_megatron.data import integrity
from cope_megatron.data.format import DataError, file_sha256, read_manifest, shard_entry
from cope_megatron.data.loader import ResumableLoader, StepShares
from cope_megatron.data.prep.shards import encode_tokens
from cope_megatron.data.source import split_spec
from cope_megatron.startup import check
from tests.helpers import debug_overrides

VICTIM = "train-000001.tar"


def copy_shards(prepared, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(prepared[0], dst)
    return dst


def spec(shard_dir, **kw):
    kw = {"seed": 3, "micro_batch_size": 4, "streams": 2, "shuffle_buffer": 8, **kw}
    return split_spec(shard_dir, read_manifest(shard_dir), "train", **kw)


def epoch(s, epochs=1):
    """A loader over ``epochs`` epochs of ``s``, drained: (token batches, loader)."""
    loader = ResumableLoader(s)
    steps = epochs * -(-s.total_samples // s.global_batch)
    return [next(loader)["tokens"] for _ in range(steps)], loader


def flip_payload(path):
    """Change one token of the first sample's payload to another id in range: same size,
    same tar structure, a valid shard to every check but the digest."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tokens.npy"))
    data = bytearray(path.read_bytes())
    last = member.offset_data + member.size - 2  # the last uint16 of the array
    data[last:last + 2] = (3 if data[last:last + 2] != b"\x03\x00" else 4).to_bytes(2, "little")
    path.write_bytes(bytes(data))


def config(shard_dir, tmp_path, **extra):
    return load_config(debug_overrides(shard_dir, tmp_path / "run", **extra))


def test_manifest_records_each_shards_size_and_digest(prepared):
    shards, manifest, _ = prepared
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            path = shards / entry["name"]
            assert entry == shard_entry(path, entry["samples"])
            assert entry["bytes"] == path.stat().st_size > 0


def test_changed_payload_of_the_same_size_is_named_before_it_is_read(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    flip_payload(dst / VICTIM)
    assert (dst / VICTIM).stat().st_size == (prepared[0] / VICTIM).stat().st_size
    epoch(spec(dst, verify="off"))  # what the issue saw: it trains to the end unnoticed
    with pytest.raises(DataError, match=rf"shard \S+/{VICTIM} does not match its sha256.*"
                                        "re-run prep"):
        epoch(spec(dst))


def test_verify_startup_fails_before_any_step_first_read_on_reading(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    flip_payload(dst / VICTIM)
    with pytest.raises(DataError, match=VICTIM):
        check(config(dst, tmp_path, **{"data.verify": "startup"}), 1)
    other = tmp_path / "other"
    shutil.copytree(dst, other)  # fresh paths: this process has no verdicts on them
    check(config(other, tmp_path), 1)  # first_read: start-up only stats the shards
    s = spec(other)
    loader = ResumableLoader(s)  # starts: nothing read yet
    with pytest.raises(DataError, match=VICTIM):
        for _ in range(s.total_samples // s.global_batch + 1):
            next(loader)


def test_each_shard_is_hashed_once_per_process(prepared, tmp_path, monkeypatch):
    dst = copy_shards(prepared, tmp_path)
    hashed = []
    monkeypatch.setattr(integrity, "file_sha256", lambda p: hashed.append(p) or file_sha256(p))
    s = spec(dst)
    epoch(s, epochs=3)
    assert sorted(hashed) == sorted(shard.url for shard in s.shards)
    # Verdicts reached before a loader starts go to its DataLoader workers with the dataset.
    assert set(StepShares(s).verdicts) >= {shard.url for shard in s.shards}


def test_verify_startup_hashes_at_start_and_never_again(prepared, tmp_path, monkeypatch):
    dst = copy_shards(prepared, tmp_path)
    hashed = []
    monkeypatch.setattr(integrity, "file_sha256", lambda p: hashed.append(p) or file_sha256(p))
    check(config(dst, tmp_path, **{"data.verify": "startup"}), 1)
    every = sum(len(split["shards"]) for split in read_manifest(dst)["splits"].values())
    assert len(hashed) == every
    epoch(spec(dst, verify="startup"), epochs=2)
    assert len(hashed) == every


def test_workers_read_only_verified_shards_and_fail_in_one_line(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    flip_payload(dst / VICTIM)
    with pytest.raises(DataError) as failure:
        epoch(spec(dst, num_workers=2, streams=4))
    assert VICTIM in str(failure.value) and "\n" not in str(failure.value)


def test_deleted_shard_stops_start_up_naming_it_or_is_skipped_and_counted(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    (dst / VICTIM).unlink()
    with pytest.raises(DataError, match=rf"{VICTIM} is missing"):
        check(config(dst, tmp_path), 1)
    with pytest.warns(UserWarning, match=rf"1 bad shards will be skipped: .*{VICTIM}"):
        check(config(dst, tmp_path, **{"data.on_error": "skip"}), 1)
    with pytest.warns(UserWarning, match=VICTIM):
        _, loader = epoch(spec(dst, on_error="skip"))
    assert loader.skipped_shards >= 1


def test_skip_counts_a_changed_shard_and_stays_deterministic(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    flip_payload(dst / VICTIM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, loader = epoch(spec(dst, on_error="skip"), epochs=2)
        again, _ = epoch(spec(dst, on_error="skip"), epochs=2)
    assert loader.skipped_shards >= 2  # once an epoch
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    with tarfile.open(prepared[0] / VICTIM) as tar:
        victim = {np.load(io.BytesIO(tar.extractfile(m).read())).tobytes()
                  for m in tar.getmembers() if m.name.endswith("tokens.npy")}
    seen = {row.numpy().astype(np.uint16).tobytes() for batch in first for row in batch}
    assert not seen & victim  # none of the skipped shard's samples were trained on


def plant_ids(path, vocab_size):
    """Rewrite the shard with one token id past the vocabulary, and its manifest entry to
    match, so only the id check can catch it."""
    records = list(wds.DataPipeline(wds.SimpleShardList([str(path)]),
                                    wds.tarfile_to_samples()))
    with wds.TarWriter(str(path), mtime=0) as tar:
        for i, record in enumerate(records):
            record = {k: v for k, v in record.items() if not k.startswith("__") or k == "__key__"}
            if i == 3:
                tokens = np.load(io.BytesIO(record["tokens.npy"]))
                tokens[5] = vocab_size + 7
                record["tokens.npy"] = encode_tokens(tokens)
            tar.write(record)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == path.name:
            entry.update(shard_entry(path, entry["samples"]))
    (path.parent / "manifest.json").write_text(json.dumps(manifest))


def test_token_ids_past_the_vocabulary_are_named_in_the_loader(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    vocab = read_manifest(dst)["vocab_size"]
    plant_ids(dst / VICTIM, vocab)
    check(config(dst, tmp_path, **{"data.verify": "startup"}), 1)  # its digest matches
    with pytest.raises(DataError, match=rf"{VICTIM}: sample \S+ holds token id {vocab + 7}, "
                                        rf"but the vocabulary has {vocab} ids"):
        epoch(spec(dst))
    with pytest.warns(UserWarning, match=VICTIM):
        _, loader = epoch(spec(dst, on_error="skip"))
    assert loader.skipped_shards >= 1


def test_remote_shards_are_not_stat_ed_or_hashed(prepared, tmp_path):
    dst = copy_shards(prepared, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["url_prefix"] = f"pipe:cat {dst}/"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    (dst / VICTIM).rename(dst / "elsewhere.tar")  # not where a stat would look: unchecked
    check(config(dst, tmp_path, **{"data.verify": "startup"}), 1)
    s = spec(dst)
    assert not any(shard.local for shard in s.shards)
