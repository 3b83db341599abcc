"""SentencePiece tokenizer: train on a sample of the corpus, or reuse a given model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from cope_megatron.data.corpus import PrepError, iter_pieces

EOS_ID = 2  # SentencePiece's default layout: unk 0, bos 1, eos 2


def _sample_lines(files: list[Path], budget: int, text_field: str) -> Iterator[str]:
    """Up to ``budget`` bytes of non-empty lines, drawn evenly across files so every
    source is represented (a prefix of one huge file would not be)."""
    per_file = max(1, budget // max(1, len(files)))
    for path in files:
        taken = 0
        for piece in iter_pieces(path, text_field):
            for line in piece.text.splitlines():
                if line.strip():
                    yield line
                    taken += len(line)
                    if taken >= per_file:
                        break
            if taken >= per_file:
                break


def train_tokenizer(
    files: list[Path],
    out_dir: Path,
    *,
    vocab_size: int,
    model_type: str,
    byte_fallback: bool,
    user_symbols: list[str],
    sample_bytes: int,
    text_field: str,
) -> Path:
    """Train a SentencePiece model into ``out_dir/tokenizer.model`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer.tmp"
    try:
        _train(files, prefix, vocab_size, model_type, byte_fallback, user_symbols, sample_bytes,
               text_field)
    except RuntimeError as e:
        raise PrepError(f"data.vocab_size: SentencePiece could not train a {vocab_size}-token "
                         f"vocabulary ({str(e).splitlines()[-1]}); raise data.vocab_size "
                         "(byte fallback alone needs 259)") from None
    final = out_dir / "tokenizer.model"
    Path(f"{prefix}.model").replace(final)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return final


def _train(files, prefix, vocab_size, model_type, byte_fallback, user_symbols, sample_bytes,
           text_field) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sample_lines(files, sample_bytes, text_field),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        user_defined_symbols=user_symbols or None,
        character_coverage=0.9995,
        # Lossless: keep newlines, runs of spaces and the exact characters, so decoding
        # reproduces the text (SentencePiece's default NFKC + whitespace folding does not).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,  # one thread: the same sample always gives the same model
        minloglevel=2,
    )


def install_tokenizer(source: str | Path, out_dir: Path) -> Path:
    """Copy a given SentencePiece model next to the shards so the data set is self-contained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "tokenizer.model"
    if Path(source).resolve() != final.resolve():
        shutil.copyfile(source, final)
    return final


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))
