"""Prep across nodes: ``prep --parts N`` (set-up), ``prep --part I --parts N`` on each node,
``prep --parts N --merge``.

- The set-up, on one node, checks the inputs, records the fingerprint and puts the
  tokenizer into ``data.shards``: the given ``data.tokenizer``, or a SentencePiece model
  trained on the whole corpus exactly as a one-node prep trains it. So the tokenizer is
  trained once, and every part encodes with the same one.
- Part I takes the I-th of N contiguous, near-equal runs of the sorted input files (a file
  is never split) and writes its shards, the tails of its files (``tails.npz``) and
  ``part.json`` into ``data.shards/part-IIIII-of-NNNNN/``. It refuses to run before the
  set-up, or against a set-up from other inputs.
- The merge checks that parts 0..N-1 are each there once, finished, from these inputs
  and this tokenizer (naming any that is not), packs the tails of all files in file order
  into the last shards, and writes ``manifest.json``, listing the parts' shards in place.

Packing restarts at every input file, its last partial sample packed after all files, in
a one-node prep too (``prep.encode_files``): so the merged data set holds the same
samples in the same order as a one-node prep of the same inputs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cope_megatron.atomic_io import write_text_atomic
from cope_megatron.config import DataConfig
from cope_megatron.data.corpus import PrepError, check_has_text, resolve_sources
from cope_megatron.data.format import has_manifest, read_manifest, write_manifest
from cope_megatron.data.prep.prep import (
    FINGERPRINT,
    check_fingerprint,
    data_meta,
    encode_files,
    input_fingerprint,
    manifest_body,
    place_tokenizer,
)
from cope_megatron.data.prep.shards import Packer, SplitWriter
from cope_megatron.data.tokenizer import load_tokenizer

PART_DONE = "part.json"
TAILS = "tails.npz"
SPLITS = ("train", "val")


def part_dir(out: Path, part: int, parts: int) -> Path:
    return out / f"part-{part:05d}-of-{parts:05d}"


def part_files(files: list[Path], part: int, parts: int) -> list[Path]:
    """The ``part``-th of ``parts`` contiguous runs of ``files``."""
    return files[part * len(files) // parts:(part + 1) * len(files) // parts]


def _inputs(data: DataConfig, seq_len: int, seed: int, parts: int) -> tuple[list[Path], dict]:
    if parts < 1:
        raise PrepError(f"--parts must be at least 1, got {parts}")
    if data.max_docs is not None and parts > 1:
        raise PrepError("data.max_docs counts documents across all inputs, which a part "
                        "cannot; unset it to prep in parts, or prep on one node")
    files = resolve_sources(data.corpus, data.cache_dir)
    return files, input_fingerprint(data, files, seq_len, seed)


def setup(data: DataConfig, *, seq_len: int, seed: int, parts: int,
          force: bool = False) -> Path:
    """The one-node first step: fingerprint and tokenizer into ``data.shards``."""
    out = Path(data.shards)
    files, fingerprint = _inputs(data, seq_len, seed, parts)
    check_has_text(files, data.text_field, data.decode_errors)
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, fingerprint, force=force)
    # The merge writes the tails' shards under a one-node prep's names: shards an
    # interrupted one-node prep left here would be taken for them.
    if (stale := sorted(p.name for p in out.glob("*.tar*"))) and not has_manifest(out):
        raise PrepError(f"data.shards: {out} holds shards of an earlier prep ({stale[0]}, ...); "
                        "delete them, or prep in parts into another data.shards")
    return place_tokenizer(data, files, out)


def _set_up(out: Path, fingerprint: dict, parts: int) -> Path:
    """The tokenizer the set-up left, refusing a missing or foreign set-up."""
    again = f"run `cope-megatron prep CONFIG --parts {parts}` (the set-up) first"
    if not (out / FINGERPRINT).is_file():
        raise PrepError(f"data.shards: {out} has no {FINGERPRINT}: {again}")
    if json.loads((out / FINGERPRINT).read_text()) != fingerprint:
        raise PrepError(f"data.shards: {out} was set up for other inputs or settings; {again} "
                        "with these configs, into another data.shards")
    found = [p for p in (out / "tokenizer.model", out / "tokenizer.json") if p.is_file()]
    if not found:
        raise PrepError(f"data.shards: {out} holds no tokenizer: {again}")
    return found[0]


def prepare_part(data: DataConfig, *, seq_len: int, seed: int, part: int, parts: int,
                 progress: bool = True) -> dict:
    """Encode part ``part`` of ``parts`` into its directory; returns its record."""
    if not 0 <= part < parts:
        raise PrepError(f"--part must be in [0, {parts}), got {part}")
    out = Path(data.shards)
    files, fingerprint = _inputs(data, seq_len, seed, parts)
    tok_path = _set_up(out, fingerprint, parts)
    here = part_dir(out, part, parts)
    if (here / PART_DONE).is_file():
        return json.loads((here / PART_DONE).read_text())
    here.mkdir(exist_ok=True)
    started = time.time()
    tokenizer = load_tokenizer(tok_path, data.eos_token, data.pad_token)
    meta = data_meta(tokenizer, seq_len)
    done = encode_files(part_files(files, part, parts), data, tok_path, here, meta,
                        seed=seed, eos=tokenizer.eos_id, progress=progress)
    for packer in done.packers.values():
        packer.finish()
    np.savez(here / TAILS, **{split: np.concatenate([np.empty(0, meta["dtype"]), *tails])
                              for split, tails in done.tails.items()})
    record = {"part": part, "parts": parts, "fingerprint": fingerprint, **meta,
              "skipped_rows": dict(done.skipped), "source_bytes": done.nbytes,
              "seconds": round(time.time() - started, 2),
              "splits": {split: {"documents": done.docs[split], "tokens": p.tokens,
                                 "shards": p.writer.shards}
                         for split, p in done.packers.items()}}
    write_text_atomic(here / PART_DONE, json.dumps(record, indent=1))
    return record


def _parts(out: Path, parts: int, fingerprint: dict, tokenizer_sha: str) -> list[dict]:
    """Parts 0..parts-1, each once, finished, from these inputs: or an error naming them."""
    strays = sorted(p.name for p in out.glob("part-*-of-*")
                    if p.is_dir() and not p.name.endswith(f"-of-{parts:05d}"))
    if strays:
        raise PrepError(f"data.shards: {out} also holds {', '.join(strays)}, parts of a prep "
                        f"into another number of parts than {parts}: each part would be there "
                        "twice; delete those directories")
    missing = [i for i in range(parts) if not (part_dir(out, i, parts) / PART_DONE).is_file()]
    if missing:
        raise PrepError(f"parts {missing} of {parts} are missing or unfinished (no "
                        f"{part_dir(out, missing[0], parts).name}/{PART_DONE}): run "
                        f"`cope-megatron prep CONFIG --part I --parts {parts}` for each")
    records = [json.loads((part_dir(out, i, parts) / PART_DONE).read_text())
               for i in range(parts)]
    for i, r in enumerate(records):
        name = part_dir(out, i, parts).name
        if (r["part"], r["parts"]) != (i, parts):
            raise PrepError(f"{name}/{PART_DONE} records part {r['part']} of {r['parts']}: "
                            "it was copied from elsewhere; re-run that part")
        if r["fingerprint"] != fingerprint:
            raise PrepError(f"{name} was prepared from other inputs or settings; re-run it")
        if r["tokenizer_sha256"] != tokenizer_sha:
            raise PrepError(f"{name} was encoded with tokenizer {r['tokenizer_sha256'][:12]}, "
                            f"not this data set's {tokenizer_sha[:12]}; re-run it")
    return records


def merge(data: DataConfig, *, seq_len: int, seed: int, parts: int) -> dict:
    """Check the parts, pack their tails, write the data set's manifest."""
    out = Path(data.shards)
    if has_manifest(out):
        return read_manifest(out)
    started = time.time()
    files, fingerprint = _inputs(data, seq_len, seed, parts)
    tok_path = _set_up(out, fingerprint, parts)
    tokenizer = load_tokenizer(tok_path, data.eos_token, data.pad_token)
    meta = data_meta(tokenizer, seq_len)
    records = _parts(out, parts, fingerprint, meta["tokenizer_sha256"])
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped_rows"])
    splits = {}
    for split in SPLITS:
        tails = [np.load(part_dir(out, r["part"], parts) / TAILS)[split] for r in records]
        packer = Packer(seq_len + 1, np.dtype(meta["dtype"]),
                        SplitWriter(out, split, meta, data.shard_max_bytes))
        packer.add(np.concatenate([np.empty(0, meta["dtype"]), *tails]))
        dropped = packer.finish()
        shards = [{**s, "name": f"{part_dir(out, r['part'], parts).name}/{s['name']}"}
                  for r in records for s in r["splits"][split]["shards"]]
        splits[split] = (sum(r["splits"][split]["documents"] for r in records),
                         shards + packer.writer.shards,
                         sum(r["splits"][split]["tokens"] for r in records) + packer.tokens,
                         dropped)
    return write_manifest(out, manifest_body(
        meta, tokenizer, tok_path, data, seed, skipped,
        sum(r["source_bytes"] for r in records),
        time.time() - started + sum(r["seconds"] for r in records), splits))
