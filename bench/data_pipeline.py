"""Benchmark the data pipeline (issue 33, Measure).

    python bench/data_pipeline.py [--corpus shakespeare] [--workers 2] [--seq 2048]

1. prep throughput (tokens/s per core) with a SentencePiece model and with a Hugging Face
   byte-level BPE (``tokenizers``), each against the bare tokenizer's own batch encode of
   the same text on one core (the limit; target: prep >= 70% of it per core);
2. the loader's tokens/s with a two-source mixture on (``data.mixture``) and document
   boundaries (``data.document_boundaries``: each batch's document starts and restarted
   positions, as the trainer makes them), against what a 1.3B model consumes on one H100
   (29k tokens/s; target >= 10x).
Prints a table and, last, one JSON line. The tokenizers are trained first, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

# The bare limit is one core: the Rust tokenizer's own thread pool would use them all (prep's
# workers set the same).
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# Only light imports at module level: prep's spawned workers re-import this script as their
# main module, and a top-level ``import torch`` cost each of them seconds of CPU that were
# counted as prep's (0.53x the bare encoder at 12 MB, where prep itself is not slower).
from cope_megatron.config import DataConfig  # noqa: E402
from cope_megatron.config.schema import MixtureSource  # noqa: E402

MODEL_TOKENS_S = 29_000
"""Tokens/s a 1.3B model trains at on one H100 (measured; issue 33)."""


def corpus_copy(corpus: list[str], cache: str, out: Path, repeat: int) -> list[Path]:
    """``repeat`` copies of the corpus' files: enough text that pool start-up is amortized."""
    from cope_megatron.data.corpus import resolve_sources

    out.mkdir(parents=True)
    for i, f in enumerate(resolve_sources(corpus, cache)):
        for r in range(repeat):
            shutil.copyfile(f, out / f"{r}-{i}-{f.name}")
    return resolve_sources([str(out)], cache)


def train_tokenizers(files: list[Path], out: Path, data: DataConfig) -> dict[str, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cope_megatron.data.tokenizer import train_tokenizer

    sp = train_tokenizer(files, out / "sp", vocab_size=8192, model_type="bpe",
                         byte_fallback=True, user_symbols=[],
                         sample_bytes=data.tokenizer_sample_bytes, text_field="text")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (out / "bpe").mkdir()
    bpe.save(str(out / "bpe" / "tokenizer.json"))
    return {"sentencepiece": sp, "tokenizers_bpe": out / "bpe" / "tokenizer.json"}


def bench_prep(kind: str, tok: Path, files: list[Path], data: DataConfig, seq: int,
               shards: Path) -> dict:
    """prep's tokens/s per core against the bare tokenizer's batch encode on one core."""
    from cope_megatron.data.prep.prep import _batches, prepare
    from cope_megatron.data.tokenizer import load_tokenizer

    started, cpu = time.perf_counter(), cpu_s()
    manifest = prepare(replace(data, shards=str(shards), tokenizer=str(tok)), seq_len=seq,
                       seed=1, progress=False)
    prep_s, prep_cpu = time.perf_counter() - started, cpu_s() - cpu
    tokenizer = load_tokenizer(tok)
    # The same text in the same groups as prep hands its workers.
    batches = [[p.text for p in b] for b in _batches(files, data, Counter()) if b]
    started, cpu = time.perf_counter(), cpu_s()
    tokens = sum(len(ids) for b in batches for ids in tokenizer.encode_batch(b))
    bare_s, bare_cpu = time.perf_counter() - started, cpu_s() - cpu
    return {"tokenizer": kind, "prep_workers": data.prep_workers,
            "mb": round(manifest["source_bytes"] / 2**20, 2), "tokens": tokens,
            "prep_wall_s": round(prep_s, 2), "prep_cpu_s": round(prep_cpu, 2),
            "prep_tok_s_per_core": round(tokens / prep_cpu),
            "prep_tok_s_per_worker_wall": round(tokens / prep_s / data.prep_workers),
            "bare_wall_s": round(bare_s, 2), "bare_cpu_s": round(bare_cpu, 2),
            "bare_tok_s_per_core": round(tokens / bare_cpu),
            "prep_vs_bare_per_core": round(bare_cpu / prep_cpu, 2)}


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (prep's workers): on a shared,
    loaded machine, tokens per CPU second is the per-core rate that wall time is not."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_loader(sources: list[MixtureSource], workers: int, batches: int) -> dict:
    import torch

    from cope_megatron.data.format import read_manifest
    from cope_megatron.data.loader import ResumableLoader
    from cope_megatron.data.mixture import mixture_of
    from cope_megatron.data.source import split_spec
    from cope_megatron.model.documents import document_starts

    manifest = read_manifest(sources[0].shards)
    spec = split_spec(sources[0].shards, manifest, "train", seed=1, micro_batch_size=8,
                      num_workers=workers, streams=8, shuffle_buffer=64)
    loader = ResumableLoader(spec, mixture=mixture_of(sources))
    next(loader)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(batches):
        inputs = next(loader)["tokens"][:, :-1]
        starts = document_starts(inputs, manifest["eos_id"])
        _ = torch.arange(inputs.shape[1]) - starts  # the restarted position ids
    rate = batches * spec.micro_batch_size * manifest["seq_len"] / (time.perf_counter()
                                                                      - started)
    loader.close()
    return {"loader_workers": workers, "mixture_sources": len(sources), "documents": True,
            "tokens_s": round(rate), "vs_model": round(rate / MODEL_TOKENS_S, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"])
    parser.add_argument("--cache", default="data/cache")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2, help="corpus copies for prep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = corpus_copy(args.corpus, args.cache, root / "corpus", args.repeat)
        data = DataConfig(corpus=[str(root / "corpus")], cache_dir=args.cache,
                          prep_workers=args.workers, val_fraction=0.02)
        toks = train_tokenizers(files, root, data)
        preps = [bench_prep(kind, tok, files, data, args.seq, root / f"shards-{kind}")
                 for kind, tok in toks.items()]
        # A second source: the same text under another seed's validation split.
        second = root / "shards-second"
        from cope_megatron.data.prep.prep import prepare

        prepare(replace(data, shards=str(second), tokenizer=str(toks["sentencepiece"])),
                seq_len=args.seq, seed=2, progress=False)
        sources = [MixtureSource(shards=str(root / "shards-sentencepiece"), weight=0.7),
                   MixtureSource(shards=str(second), weight=0.3)]
        loaders = [bench_loader(sources, w, args.batches) for w in (1, 2)]
    print("per core = tokens per CPU second (prep: main process and workers together)")
    print(f"{'prep':<16}{'workers':>8}{'MB':>8}{'tokens':>12}{'prep tok/s/core':>17}"
          f"{'bare tok/s/core':>17}{'ratio':>7}{'prep wall s':>12}")
    for r in preps:
        print(f"{r['tokenizer']:<16}{r['prep_workers']:>8}{r['mb']:>8}{r['tokens']:>12,}"
              f"{r['prep_tok_s_per_core']:>17,}{r['bare_tok_s_per_core']:>17,}"
              f"{r['prep_vs_bare_per_core']:>7}{r['prep_wall_s']:>12} (target ratio >= 0.7)")
    print(f"{'loader (mixture, documents)':<16}{'workers':>8}{'tokens/s':>12}{'x 29k':>8}")
    for r in loaders:
        print(f"{'':<16}{r['loader_workers']:>8}{r['tokens_s']:>12,}{r['vs_model']:>8}"
              " (target >= 10)")
    print(json.dumps({"seq": args.seq, "prep": preps, "loader": loaders,
                      "model_tokens_s": MODEL_TOKENS_S, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
