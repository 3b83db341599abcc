"""What shard verification costs (``data.verify``, cope_megatron/data/integrity.py).

    python bench/data_verify.py [--seq 128] [--docs 40]

Prepares a synthetic corpus, then times (1) sha256 of every train shard (what
``data.verify=startup`` adds before the first step) against (2) one epoch through the
loader in one process with ``verify=off`` and ``verify=first_read`` (the default: each shard
hashed just before its first read). Prints one line each and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def epoch_seconds(shards: Path, verify: str) -> float:
    from cope_megatron.data.format import read_manifest
    from cope_megatron.data.loader import ResumableLoader
    from cope_megatron.data.source import split_spec

    spec = split_spec(shards, read_manifest(shards), "train", seed=1, micro_batch_size=16,
                      streams=16, verify=verify)
    loader = ResumableLoader(spec)
    started = time.perf_counter()
    for _ in range(spec.total_samples // spec.global_batch):
        next(loader)
    return time.perf_counter() - started


def main() -> None:
    from cope_megatron.config import DataConfig
    from cope_megatron.data.format import file_sha256, read_manifest
    from cope_megatron.data.prep.prep import prepare
    from tests.helpers import write_corpus

    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--docs", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus", docs=args.docs, words_per_doc=60_000)
        prepare(DataConfig(corpus=[str(root / "corpus")], shards=str(root / "shards"),
                           cache_dir=str(root / "cache"), shard_max_bytes=4 * 2**20),
                seq_len=args.seq, seed=1, progress=False)
        entries = read_manifest(root / "shards")["splits"]["train"]["shards"]
        mib = sum(e["bytes"] for e in entries) / 2**20
        started = time.perf_counter()
        for e in entries:
            file_sha256(root / "shards" / e["name"])
        hash_s = time.perf_counter() - started
        times: dict[str, list[float]] = {"off": [], "first_read": []}
        for run in range(2):
            for verify in times:
                # A fresh copy: this process has verified none of its shards yet.
                copy = root / f"copy-{verify}-{run}"
                shutil.copytree(root / "shards", copy)
                times[verify].append(epoch_seconds(copy, verify))
    off, first = min(times["off"]), min(times["first_read"])
    print(f"seq {args.seq}: {len(entries)} train shards, {mib:.1f} MiB")
    print(f"sha256 of every train shard: {hash_s:.3f} s ({mib / hash_s:.0f} MiB/s)")
    print(f"one epoch through the loader: verify=off {off:.2f} s ({mib / off:.1f} MiB/s), "
          f"first_read {first:.2f} s; hashing is {100 * hash_s / off:.1f}% of the read time")
    print(json.dumps({"seq": args.seq, "shards": len(entries), "mib": round(mib, 1),
                      "hash_s": round(hash_s, 3), "epoch_off_s": round(off, 2),
                      "epoch_first_read_s": round(first, 2)}))


if __name__ == "__main__":
    main()
