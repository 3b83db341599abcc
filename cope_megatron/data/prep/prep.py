"""``cope-megatron prep``: corpus -> tokenizer (SentencePiece trained here, or a given
SentencePiece model or Hugging Face tokenizer.json) -> packed WebDataset shards.

Writes into ``data.shards``: ``tokenizer.model`` (or ``tokenizer.json``), ``train-*.tar``,
``val-*.tar`` and ``manifest.json`` (written last, atomically: its presence means the data
set is complete).
Packing restarts at each input file; each file's last partial sample is packed after
all files (``encode_files``), which is what lets ``parts`` prep files on several nodes
into the same samples. Rerunning after a crash keeps the shards already finished and
writes the rest. A
non-empty directory that holds neither our fingerprint nor our manifest is refused
(``--force`` writes into it anyway).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cope_megatron.config import DataConfig
from cope_megatron.data.corpus import (
    Piece,
    PrepError,
    check_has_text,
    iter_pieces,
    resolve_sources,
)
from cope_megatron.data.format import (
    MANIFEST,
    file_sha256,
    has_manifest,
    read_manifest,
    write_manifest,
)
from cope_megatron.data.prep import encode_worker
from cope_megatron.data.prep.shards import Packer, SplitWriter, token_dtype
from cope_megatron.data.tokenizer import (
    install_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from cope_megatron.output_dir import check_output_dir

FINGERPRINT = "prep_fingerprint.json"
PACKING = "per_file"
"""Packing restarts at each input file, its last partial sample packed after all files
(``encode_files``); data sets finished before, packed across files, stay valid."""


def is_validation(doc: str, seed: int, fraction: float) -> bool:
    """Split by document, by a seeded hash of its name (file name, and record number for
    JSONL): stable whatever the order, the worker count, or where the corpus lies (hashing
    the full path made the split of a copied corpus differ, and a test fixture in a fresh
    temporary directory drew no validation documents about one run in 30)."""
    digest = hashlib.sha256(f"{seed}:{Path(doc).name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _pieces(path: Path, data: DataConfig, skipped: Counter) -> Iterator[Piece]:
    yield from iter_pieces(path, data.text_field, data.decode_errors,
                           join_rows=data.join_rows, join_rows_n=data.join_rows_n,
                           skipped=skipped)


def _batches(files: list[Path], data: DataConfig, skipped: Counter, chars: int = 1 << 20,
             count: int = 256) -> Iterator[list[Piece]]:
    """Pieces in groups of up to ``count`` or about ``chars`` characters: one task for an
    encode worker, so that short documents (a parquet row each) do not cost one
    inter-process round trip apiece. An empty group ends each file; ``data.max_docs``
    documents end the whole."""
    docs, max_docs = 0, data.max_docs
    for path in files:
        batch, size = [], 0
        for piece in _pieces(path, data, skipped):
            batch.append(piece)
            size += len(piece.text)
            docs += piece.last
            if size >= chars or len(batch) >= count or docs == max_docs:
                yield batch
                batch, size = [], 0
            if docs == max_docs:
                yield []
                return
        if batch:
            yield batch
        yield []


@dataclass
class Encoded:
    """What encoding a run of input files left: per split its packer (whose writer holds
    the finished shards), documents, and the tails, one per file, of fewer tokens than a
    sample (packing restarts at each file, so that files prepared apart pack alike)."""

    packers: dict[str, Packer]
    docs: dict[str, int]
    tails: dict[str, list[np.ndarray]]
    skipped: Counter
    nbytes: int


def encode_files(files: list[Path], data: DataConfig, tok_path: Path, out: Path, meta: dict,
                 *, seed: int, eos: int, progress: bool) -> Encoded:
    """Tokenize ``files`` in order on ``data.prep_workers`` processes into packed shards in
    ``out``; each file's last partial sample is kept aside in ``tails``."""
    dtype, started = np.dtype(meta["dtype"]), time.time()
    packers = {split: Packer(meta["seq_len"] + 1, dtype,
                             SplitWriter(out, split, meta, data.shard_max_bytes))
               for split in ("train", "val")}
    done = Encoded(packers, {"train": 0, "val": 0}, {"train": [], "val": []}, Counter(), 0)
    # Progress in input bytes, so tqdm can show an ETA (compressed inputs count their
    # decompressed text against their compressed size: the ETA is then pessimistic).
    bar = tqdm(desc="prep", total=sum(f.stat().st_size for f in files), unit="B",
               unit_scale=True, disable=not progress, dynamic_ncols=True)
    with mp.get_context("spawn").Pool(data.prep_workers, encode_worker.init,
                                        (str(tok_path), data.eos_token,
                                         data.pad_token)) as pool:
        for batch in pool.imap(encode_worker.encode, _batches(files, data, done.skipped),
                               chunksize=2):
            if not batch:  # a file ended
                for split, packer in packers.items():
                    done.tails[split].append(packer.cut())
            for doc, ids, last, size in batch:
                split = "val" if is_validation(doc, seed, data.val_fraction) else "train"
                packers[split].add(np.append(ids, eos) if last else ids)
                done.nbytes += size
                bar.update(size)
                done.docs[split] += last
            if batch:
                elapsed = time.time() - started
                bar.set_postfix(docs_s=f"{sum(done.docs.values()) / elapsed:.1f}",
                                tok_s=f"{sum(p.tokens for p in packers.values()) / elapsed:.0f}")
    bar.close()
    return done


def check_fingerprint(out: Path, fingerprint: dict, *, force: bool = False) -> None:
    """Refuse a directory prepared (or being prepared) from other inputs, or a non-empty one
    that prep did not write (unless ``force``); record ``fingerprint`` in a new one."""
    check_output_dir(out, (FINGERPRINT, MANIFEST), "prepared data set", force=force)
    path = out / FINGERPRINT
    if path.exists():
        old = json.loads(path.read_text())
        if "packing" in fingerprint and "packing" not in old:  # a text prep before PACKING
            if not has_manifest(out):
                raise PrepError(f"data.shards: {out} holds an unfinished prep by an older "
                                "version, which packed across input files; delete the "
                                "directory and re-run")
            old = {**old, "packing": fingerprint["packing"]}  # finished: its shards stand
        if old != fingerprint:
            changed = sorted(k for k in {*old, *fingerprint} if old.get(k) != fingerprint.get(k))
            raise PrepError(
                f"data.shards: {out} holds shards prepared from other inputs (changed: "
                f"{changed}); point data.shards at another directory or delete this one"
            )
    else:
        path.write_text(json.dumps(fingerprint, indent=1))


def input_fingerprint(data: DataConfig, files: list[Path], seq_len: int, seed: int) -> dict:
    """Everything the shards depend on: a directory prepared from other inputs is refused,
    whether that prep finished or was interrupted."""
    return {
        "packing": PACKING,
        "files": [[str(f), f.stat().st_size] for f in files], "seq_len": seq_len,
        "seed": seed, "val_fraction": data.val_fraction, "max_docs": data.max_docs,
        "text_field": data.text_field,
        # Only when set: fingerprints from before these keys existed stay valid.
        **{key: getattr(data, key) for key in ("join_rows", "join_rows_n", "eos_token",
                                               "pad_token")
           if getattr(data, key) != getattr(DataConfig(), key)},
        "tokenizer": file_sha256(data.tokenizer) if data.tokenizer else {
            "vocab_size": data.vocab_size, "type": data.tokenizer_type,
            "byte_fallback": data.byte_fallback, "user_symbols": data.user_symbols,
            "sample_bytes": data.tokenizer_sample_bytes,
            # Only when changed: fingerprints from before the key existed stay valid.
            **({"max_line_chars": data.max_line_chars}
               if data.max_line_chars != DataConfig().max_line_chars else {})},
    }


def place_tokenizer(data: DataConfig, files: list[Path], out: Path) -> Path:
    """The data set's tokenizer in ``out``: the given one, one an interrupted earlier run
    trained, or one trained now on ``files``."""
    if data.tokenizer:
        return install_tokenizer(data.tokenizer, out)
    if (out / "tokenizer.model").exists():
        return out / "tokenizer.model"
    return train_tokenizer(
        files, out, vocab_size=data.vocab_size, model_type=data.tokenizer_type,
        byte_fallback=data.byte_fallback, user_symbols=data.user_symbols,
        sample_bytes=data.tokenizer_sample_bytes, text_field=data.text_field,
        max_line_chars=data.max_line_chars, decode_errors=data.decode_errors,
    )


def data_meta(tokenizer, seq_len: int) -> dict:
    """What every shard's header records (``format.SHARD_META_KEY``)."""
    return {"seq_len": seq_len, "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer_sha256": tokenizer.sha256}


def prepare(data: DataConfig, *, seq_len: int, seed: int, progress: bool = True,
            force: bool = False) -> dict:
    """Run the whole prep into ``data.shards`` and return the manifest (also written there).

    Samples hold ``seq_len + 1`` tokens; ``seed`` fixes the validation split; ``force``
    writes into a non-empty directory prep did not write.
    """
    out = Path(data.shards)
    files = resolve_sources(data.corpus, data.cache_dir)
    fingerprint = input_fingerprint(data, files, seq_len, seed)
    if not has_manifest(out):  # before the fingerprint, so a fixed input is not "other"
        check_has_text(files, data.text_field, data.decode_errors)
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, fingerprint, force=force)
    if has_manifest(out):
        return read_manifest(out)
    started = time.time()

    tok_path = place_tokenizer(data, files, out)
    tokenizer = load_tokenizer(tok_path, data.eos_token, data.pad_token)
    meta = data_meta(tokenizer, seq_len)
    done = encode_files(files, data, tok_path, out, meta, seed=seed, eos=tokenizer.eos_id,
                        progress=progress)
    for split, packer in done.packers.items():  # the files' tails, packed last
        packer.add(np.concatenate([np.empty(0, packer.dtype), *done.tails[split]]))
    splits = {split: (done.docs[split], p.writer.shards, p.tokens, p.finish())
              for split, p in done.packers.items()}
    return write_manifest(out, manifest_body(meta, tokenizer, tok_path, data, seed,
                                             done.skipped, done.nbytes,
                                             time.time() - started, splits))


def manifest_body(meta: dict, tokenizer, tok_path: Path, data: DataConfig, seed: int,
                  skipped: Counter, nbytes: int, seconds: float,
                  splits: dict[str, tuple[int, list[dict], int, int]]) -> dict:
    """The manifest of a finished prep; ``splits``: per split (documents, shard entries,
    tokens in samples, tokens dropped); refuses a split without samples."""
    for split, (docs, shards, _, dropped) in splits.items():
        if not sum(s["samples"] for s in shards):
            raise PrepError(
                f"prep produced no {split} samples ({docs} documents, {dropped} tokens): the "
                f"corpus is too small for seq_len {meta['seq_len']}"
                + (" or data.val_fraction is too small" if split == "val" else ""))
    return {
        **meta,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        # As stated in config (None: the tokenizer's own): ``dataset_tokenizer`` reads them.
        "eos_token": data.eos_token,
        "pad_token": data.pad_token,
        "tokenizer": tok_path.name,
        # Null and empty rows of parquet/Arrow inputs, which make no document.
        "skipped_rows": dict(skipped),
        "seed": seed,
        "source_bytes": nbytes,
        "seconds": round(seconds, 2),
        "splits": {
            split: {"documents": docs, "samples": sum(s["samples"] for s in shards),
                    "tokens": tokens, "dropped_tokens": dropped, "shards": shards}
            for split, (docs, shards, tokens, dropped) in splits.items()
        },
    }
