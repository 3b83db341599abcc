"""Benchmark the data pipeline.

    python bench/data_pipeline.py [--corpus shakespeare] [--workers 2] [--seq 128]

1. prep throughput (MB/s, tokens/s, per core) against plain single-process SentencePiece
   encoding of the same text with the same tokenizer;
2. loader throughput (samples/s per DataLoader worker) against the rate at which models
   consume samples: the debug model and the 125M model (one fwd+bwd+step timed on this
   machine, plain PyTorch, no parallelism).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from cope_megatron.config import DataConfig
from cope_megatron.pe import get_pe


def bench_prep(corpus: list[str], cache: str, seq: int, workers: int, repeat: int) -> dict:
    from cope_megatron.data.corpus import iter_pieces, resolve_sources
    from cope_megatron.data.prep.prep import prepare
    from cope_megatron.data.tokenizer import load_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # ``repeat`` copies of the corpus: enough text that pool start-up is amortized.
        for i, f in enumerate(resolve_sources(corpus, cache)):
            for r in range(repeat):
                shutil.copyfile(f, Path(tmp) / f"{r}-{i}-{f.name}")
        files = resolve_sources([tmp], cache)
        data = DataConfig(corpus=[tmp], cache_dir=cache, prep_workers=workers)
        # Tokenizer first (not timed): prep's throughput is the tokenize+pack+write stage.
        tokenizer = train_tokenizer(
            files, Path(tmp) / "tok", vocab_size=data.vocab_size, model_type=data.tokenizer_type,
            byte_fallback=data.byte_fallback, user_symbols=data.user_symbols,
            sample_bytes=data.tokenizer_sample_bytes, text_field=data.text_field)
        started = time.perf_counter()
        manifest = prepare(replace(data, shards=f"{tmp}/shards", tokenizer=str(tokenizer)),
                           seq_len=seq, seed=1, progress=False)
        prep_s = time.perf_counter() - started
        sp = load_tokenizer(tokenizer)
        started = time.perf_counter()
        tokens = sum(len(sp.encode(p.text)) for f in files for p in iter_pieces(f))
        single_s = time.perf_counter() - started
    mb = manifest["source_bytes"] / 2**20
    return {"prep_workers": workers, "mb": round(mb, 2), "tokens": tokens,
            "prep_s": round(prep_s, 2), "prep_mb_s": round(mb / prep_s, 2),
            "prep_tok_s_per_core": round(tokens / prep_s / workers),
            "sp_single_s": round(single_s, 2), "sp_single_mb_s": round(mb / single_s, 2),
            "prep_vs_single_process": round(single_s / prep_s, 2)}


def bench_loader(shard_dir: str, seq: int, workers: int, batches: int) -> dict:
    from cope_megatron.data.format import read_manifest
    from cope_megatron.data.loader import ResumableLoader
    from cope_megatron.data.source import split_spec

    spec = split_spec(shard_dir, read_manifest(shard_dir), "train", seed=1,
                      micro_batch_size=16, num_workers=workers)
    loader = ResumableLoader(spec)
    next(loader)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * spec.micro_batch_size / (time.perf_counter() - started)
    return {"loader_workers": workers, "samples_s": round(rate), "samples_s_per_worker":
            round(rate / max(1, workers)), "tokens_s": round(rate * seq)}


def model_rate(config: str, seq: int, micro_batch: int) -> dict:
    """Samples/s one process trains at (median of 3 steps after a warm-up)."""
    from cope_megatron.cli import CONFIG_DIR
    from cope_megatron.config import load_config
    from cope_megatron.distributed.parallel import destroy_distributed, init_distributed
    from cope_megatron.model.gpt import build_gpt, lm_loss

    cfg = load_config([str(CONFIG_DIR / "model" / config), f"model.seq_length={seq}",
                       "train.precision=fp32"])
    init_distributed(1)
    model = build_gpt(cfg, get_pe(cfg.model.pe), cfg.data.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.data.vocab_size, (micro_batch, seq + 1))
    times = []
    for _ in range(4):
        started = time.perf_counter()
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - started)
    destroy_distributed()
    step = sorted(times[1:])[1]
    return {"model": config, "seq": seq, "micro_batch": micro_batch,
            "step_s": round(step, 3), "samples_s": round(micro_batch / step, 2),
            "tokens_s": round(micro_batch * seq / step)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"])
    parser.add_argument("--cache", default="data/cache")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=4, help="corpus copies for the prep run")
    args = parser.parse_args()
    prep = bench_prep(args.corpus, args.cache, args.seq, args.workers, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        from cope_megatron.data.prep.prep import prepare

        prepare(DataConfig(corpus=args.corpus, shards=tmp, cache_dir=args.cache,
                           prep_workers=args.workers), seq_len=args.seq, seed=1, progress=False)
        loaders = [bench_loader(tmp, args.seq, w, args.batches) for w in (1, 2)]
    models = [model_rate("debug.yaml", args.seq, 16), model_rate("125m.yaml", 2048, 1)]
    print(f"prep: {prep['mb']} MB, {prep['tokens']:,} tokens with {prep['prep_workers']} "
          f"workers: {prep['prep_s']} s = {prep['prep_mb_s']} MB/s, "
          f"{prep['prep_tok_s_per_core']:,} tokens/s per core; single-process SentencePiece "
          f"encode: {prep['sp_single_s']} s ({prep['sp_single_mb_s']} MB/s); "
          f"prep/single = {prep['prep_vs_single_process']}x")
    for r in loaders:
        print(f"loader: {r['loader_workers']} worker(s): {r['samples_s']} samples/s "
              f"({r['samples_s_per_worker']} per worker), {r['tokens_s']:,} tokens/s")
    for r in models:
        print(f"model {r['model']} seq {r['seq']}: {r['step_s']} s/step, consumes "
              f"{r['samples_s']} samples/s = {r['tokens_s']:,} tokens/s per process")
    print(json.dumps({"prep": prep, "loader": loaders, "models": models}))


if __name__ == "__main__":
    main()
