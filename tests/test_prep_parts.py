"""Prep across nodes (``prep --parts N``: set-up, ``--part I`` each, ``--merge``): the
merged data set holds the samples of a one-node prep of the same inputs, in its order;
a missing, foreign or doubled part is refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cope_megatron.cli import main
from cope_megatron.data.corpus import PrepError
from cope_megatron.data.format import read_manifest
from cope_megatron.data.prep import parts
from cope_megatron.data.prep.prep import prepare
from cope_megatron.data.source import ordered_samples, split_spec
from tests.helpers import small_data, write_corpus

SEQ, SEED = 32, 7


def sample_hashes(shards) -> dict[str, list[str]]:
    manifest = read_manifest(shards)
    return {split: [hashlib.sha256(t.tobytes()).hexdigest()
                    for t, _ in ordered_samples(split_spec(shards, manifest, split))]
            for split in ("train", "val")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prepared):
    """(root, data config): seven files of uneven length, the session's tokenizer."""
    root = tmp_path_factory.mktemp("parts")
    (root / "corpus").mkdir()
    for i, words in enumerate((900, 40, 2500, 600, 1300, 30, 1700)):
        for path in write_corpus(root / f"f{i}", docs=2, words_per_doc=words, seed=i):
            # Validation is drawn by file name: give each file its own.
            shutil.move(path, root / "corpus" / f"f{i}-{Path(path).name}")
    data = small_data(root, tokenizer=str(prepared[0] / "tokenizer.model"), prep_workers=1,
                      shard_max_bytes=4000)
    return root, data


def run_parts(data, n: int, only: range | None = None) -> None:
    kw = dict(seq_len=SEQ, seed=SEED, parts=n)
    parts.setup(data, **kw)
    for i in only if only is not None else range(n):
        parts.prepare_part(data, part=i, progress=False, **kw)


def test_parts_merge_to_the_one_node_data_set(inputs, tmp_path):
    root, data = inputs
    one = prepare(data, seq_len=SEQ, seed=SEED, progress=False)
    spread = data.__class__(**{**{f: getattr(data, f) for f in data.__slots__},
                               "shards": str(tmp_path / "spread")})
    run_parts(spread, 3)
    merged = parts.merge(spread, seq_len=SEQ, seed=SEED, parts=3)
    want, got = sample_hashes(data.shards), sample_hashes(spread.shards)
    assert want == got and len(want["train"]) > 20 and want["val"]
    for split in ("train", "val"):
        for key in ("documents", "samples", "tokens", "dropped_tokens"):
            assert merged["splits"][split][key] == one["splits"][split][key], (split, key)
    assert merged["tokenizer_sha256"] == one["tokenizer_sha256"]
    assert any(s["name"].startswith("part-00002-of-00003/")
               for s in merged["splits"]["train"]["shards"])


def test_missing_foreign_and_doubled_parts_are_refused_by_name(inputs, tmp_path):
    _, data = inputs
    spread = data.__class__(**{**{f: getattr(data, f) for f in data.__slots__},
                               "shards": str(tmp_path / "spread")})
    with pytest.raises(PrepError, match=r"no prep_fingerprint.json: run `cope-megatron prep "
                                        r"CONFIG --parts 3`"):
        parts.prepare_part(spread, seq_len=SEQ, seed=SEED, part=0, parts=3, progress=False)
    run_parts(spread, 3, only=range(0, 3, 2))
    with pytest.raises(PrepError, match=r"parts \[1\] of 3 .*part-00001-of-00003/part.json"):
        parts.merge(spread, seq_len=SEQ, seed=SEED, parts=3)
    out = tmp_path / "spread"
    shutil.copytree(out / "part-00000-of-00003", out / "part-00001-of-00003")
    with pytest.raises(PrepError, match="part-00001-of-00003/part.json records part 0 of 3"):
        parts.merge(spread, seq_len=SEQ, seed=SEED, parts=3)
    shutil.rmtree(out / "part-00001-of-00003")
    parts.prepare_part(spread, seq_len=SEQ, seed=SEED, part=1, parts=3, progress=False)
    record = out / "part-00002-of-00003" / "part.json"
    saved = record.read_text()
    record.write_text(json.dumps({**json.loads(saved), "tokenizer_sha256": "0" * 64}))
    with pytest.raises(PrepError, match="part-00002-of-00003 was encoded with tokenizer 000"):
        parts.merge(spread, seq_len=SEQ, seed=SEED, parts=3)
    record.write_text(saved)
    (out / "part-00000-of-00002").mkdir()
    with pytest.raises(PrepError, match="holds part-00000-of-00002.*twice"):
        parts.merge(spread, seq_len=SEQ, seed=SEED, parts=3)
    (out / "part-00000-of-00002").rmdir()
    with pytest.raises(PrepError, match="was set up for other inputs"):
        parts.prepare_part(data.__class__(**{**{f: getattr(data, f) for f in data.__slots__},
                                             "shards": str(out), "val_fraction": 0.5}),
                           seq_len=SEQ, seed=SEED, part=0, parts=3, progress=False)
    assert parts.merge(spread, seq_len=SEQ, seed=SEED, parts=3)["splits"]["train"]["samples"]


def test_cli_runs_the_three_steps(inputs, tmp_path, capsys):
    _, data = inputs
    args = [f"data.corpus=[{data.corpus[0]}]", f"data.shards={tmp_path / 'cli'}",
            f"data.tokenizer={data.tokenizer}", "data.prep_workers=1", "data.vocab_size=512",
            f"model.seq_length={SEQ}", f"train.seed={SEED}", "data.val_fraction=0.25",
            "logging.progress=false"]
    assert main(["prep", *args, "--parts", "2", "--merge"]) == 2
    assert "no prep_fingerprint.json" in capsys.readouterr().err
    for extra in ([], ["--part", "0"], ["--part", "1"], ["--merge"]):
        assert main(["prep", *args, "--parts", "2", *extra]) == 0, capsys.readouterr().err
    assert (tmp_path / "cli" / "manifest.json").is_file()


FAKE_SBATCH = """#!/usr/bin/env bash
# sbatch stand-in: logs the job's dependency, runs its --wrap now (each array index in turn).
array=; wrap=; dep=none
while [ $# -gt 0 ]; do
  case "$1" in --array) array=$2; shift ;; --wrap) wrap=$2; shift ;;
               --dependency) dep=$2; shift ;; esac
  shift
done
id=job$(cat "$FAKE_LOG" 2>/dev/null | grep -c '^job' || true)
echo "$id after $dep" >> "$FAKE_LOG"
for i in $(if [ -n "$array" ]; then seq "${array%-*}" "${array#*-}"; else echo -; fi); do
  SLURM_ARRAY_TASK_ID=$i bash -c "$wrap" >> "$FAKE_LOG"
done
echo "$id"
"""


def test_slurm_example_chains_set_up_array_and_merge(tmp_path):
    """launch/prep_parts.sh under a stand-in sbatch, with PYTHON=echo: each job's command
    line as its node would run it."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "sbatch").write_text(FAKE_SBATCH)
    (tmp_path / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": "echo",
           "PARTS": "3", "FAKE_LOG": str(tmp_path / "log")}
    out = subprocess.run(["bash", str(root / "launch" / "prep_parts.sh"), "a.yaml",
                          "data.shards=/shared/x y"], cwd=root, env=env, text=True,
                         capture_output=True, check=True)
    assert "set-up job job0, parts array job1, merge job job2" in out.stdout
    prep = "-m cope_megatron prep a.yaml data.shards=/shared/x y --parts 3"
    assert (tmp_path / "log").read_text().splitlines() == [
        "job0 after none", prep,
        "job1 after afterok:job0", *(f"{prep} --part {i}" for i in range(3)),
        "job2 after afterok:job1", f"{prep} --merge"]


def test_set_up_refuses_shards_an_interrupted_one_node_prep_left(inputs, tmp_path):
    """The merge names its tail shards as a one-node prep does: a leftover would be taken
    for one, its bytes recorded with the tail's sample count."""
    _, data = inputs
    out = tmp_path / "spread"
    spread = data.__class__(**{**{f: getattr(data, f) for f in data.__slots__},
                               "shards": str(out)})
    parts.setup(spread, seq_len=SEQ, seed=SEED, parts=3)  # the same fingerprint as prep's
    (out / "train-000000.tar").write_bytes(b"left by an interrupted one-node prep")
    with pytest.raises(PrepError, match=r"holds shards of an earlier prep \(train-000000.tar"):
        parts.setup(spread, seq_len=SEQ, seed=SEED, parts=3)
