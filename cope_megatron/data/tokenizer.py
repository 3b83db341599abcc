"""SentencePiece tokenizer: train on a sample of the corpus, or reuse a given model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from cope_megatron.config import DataConfig
from cope_megatron.data.corpus import PrepError, iter_pieces

EOS_ID = 2  # SentencePiece's default layout: unk 0, bos 1, eos 2
_DEFAULTS = DataConfig()


def _lines_of(path: Path, text_field: str, max_line_chars: int,
              decode_errors: str) -> Iterator[str]:
    """The file's non-blank lines, a line longer than ``max_line_chars`` cut into lines of
    that length: SentencePiece silently drops a sentence longer than its limit, and a
    corpus of such lines left it nothing to learn from."""
    for piece in iter_pieces(path, text_field, decode_errors):
        for whole in piece.text.splitlines():
            for start in range(0, len(whole), max_line_chars):
                line = whole[start:start + max_line_chars]
                if line.strip():
                    yield line


def _sample_lines(files: list[Path], budget: int, text_field: str, max_line_chars: int,
                  decode_errors: str) -> Iterator[str]:
    """Up to ``budget`` bytes of lines, drawn evenly across files so every source is
    represented (a prefix of one huge file would not be)."""
    per_file = max(1, budget // max(1, len(files)))
    for path in files:
        taken = 0
        for line in _lines_of(path, text_field, max_line_chars, decode_errors):
            yield line
            taken += len(line)
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
    max_line_chars: int = _DEFAULTS.max_line_chars,
    decode_errors: str = _DEFAULTS.decode_errors,
) -> Path:
    """Train a SentencePiece model into ``out_dir/tokenizer.model`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer.tmp"
    unreadable: list[PrepError] = []

    def sample() -> Iterator[str]:
        # SentencePiece would report an input's error as its own RuntimeError: keep ours.
        try:
            yield from _sample_lines(files, sample_bytes, text_field, max_line_chars,
                                     decode_errors)
        except PrepError as e:
            unreadable.append(e)

    try:
        _train(sample(), prefix, vocab_size, model_type, byte_fallback, user_symbols,
               max_line_chars)
    except RuntimeError as e:
        if not unreadable:
            raise _training_error(e, vocab_size, files) from None
    if unreadable:
        raise unreadable[0]
    final = out_dir / "tokenizer.model"
    Path(f"{prefix}.model").replace(final)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return final


def _training_error(error: RuntimeError, vocab_size: int, files: list[Path]) -> PrepError:
    """SentencePiece's failure as advice: only a vocabulary too small for the characters
    it must cover calls for a larger data.vocab_size."""
    reason = str(error).splitlines()[-1]
    if "required_chars" in reason:
        return PrepError(f"data.vocab_size: SentencePiece could not train a {vocab_size}-token "
                         f"vocabulary ({reason}); raise data.vocab_size (byte fallback alone "
                         "needs 259)")
    if "sentences_.empty()" in reason:
        reason = "no line of text to learn from"
    names = ", ".join(str(f) for f in files[:3]) + (" …" if len(files) > 3 else "")
    return PrepError(f"data.corpus: SentencePiece could not train a tokenizer on {names} "
                     f"({reason}); check that the corpus holds text, or give a trained "
                     "model as data.tokenizer")


def _train(sample, prefix, vocab_size, model_type, byte_fallback, user_symbols,
           max_line_chars) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sample,
        # In bytes: room for a cut line of 4-byte characters.
        max_sentence_length=4 * max_line_chars,
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
