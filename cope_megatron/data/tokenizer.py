"""The data set's tokenizer: a SentencePiece model (trained here on a sample of the corpus,
or given), or a pretrained Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), behind
one interface (``Tokenizer``) that prep, evaluation and export use.

Each names its end-of-document token (appended after every document by prep) and its
padding token, read from the tokenizer or stated in config (``data.eos_token``,
``data.pad_token``); the manifest records both, so every later reader resolves the same ids.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from cope_megatron.config import DataConfig
from cope_megatron.data.corpus import PrepError, iter_pieces
from cope_megatron.data.format import file_sha256

_DEFAULTS = DataConfig()
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
"""End-of-document tokens of common pretrained tokenizers (GPT-2 and Qwen, Llama-2 and
Mistral, Llama-3, Gemma), looked for in this order when config names none."""
PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")


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


def is_huggingface(path: str | Path) -> bool:
    """A ``tokenizer.json`` (any ``.json``) is a Hugging Face tokenizer; anything else a
    SentencePiece model."""
    return Path(path).suffix == ".json"


def install_tokenizer(source: str | Path, out_dir: Path) -> Path:
    """Copy a given tokenizer next to the shards (as ``tokenizer.model`` or
    ``tokenizer.json``) so the data set is self-contained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / ("tokenizer.json" if is_huggingface(source) else "tokenizer.model")
    if Path(source).resolve() != final.resolve():
        shutil.copyfile(source, final)
    return final


class Tokenizer(ABC):
    """What the rest of the system needs of a tokenizer. Subclasses load ``path`` and set
    ``eos_id``, ``pad_id`` (None: the tokenizer has none) and ``vocab_size``."""

    path: Path
    eos_id: int
    pad_id: int | None
    vocab_size: int
    """Token ids are below this."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The text's ids, exactly: no added BOS/EOS or normalization beyond the model's."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text."""

    @abstractmethod
    def encode_part(self, text: str) -> list[int]:
        """Ids of one part of a prompt assembled from separately encoded parts (passkey,
        RULER): the text as it reads after a space in running text, so that parts join
        into words and a value is the same tokens in its needle and in its answer."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; control and special tokens decode to nothing."""

    @abstractmethod
    def token_id(self, token: str) -> int | None:
        """The id of the vocabulary entry ``token``, None when there is none."""

    @abstractmethod
    def token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id``."""

    @cached_property
    def sha256(self) -> str:
        """The tokenizer file's digest: the manifest's ``tokenizer_sha256``."""
        return file_sha256(self.path)

    def _resolve(self, eos_token: str | None, pad_token: str | None, own_eos: int | None,
                 own_pad: int | None) -> None:
        """Set ``eos_id`` and ``pad_id``: the stated tokens, else the tokenizer's own."""
        self.eos_id = self._stated("data.eos_token", eos_token) if eos_token else own_eos
        self.pad_id = self._stated("data.pad_token", pad_token) if pad_token else own_pad
        if self.eos_id is None:
            raise PrepError(f"data.eos_token: {self.path} has no end-of-document token that "
                            f"prep knows ({', '.join(EOS_CANDIDATES)}); name the one to "
                            "append after each document")

    def _stated(self, key: str, token: str) -> int:
        found = self.token_id(token)
        if found is None:
            raise PrepError(f"{key}: {token!r} is not a token of {self.path}; name one of "
                            "its vocabulary entries")
        return found


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path, eos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        own = (self.sp.eos_id(), self.sp.pad_id())
        self._resolve(eos_token, pad_token, *(i if i >= 0 else None for i in own))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_part(self, text: str) -> list[int]:
        return self.sp.encode(text)  # the dummy prefix is the leading space

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_id(self, token: str) -> int | None:
        found = self.sp.piece_to_id(token)  # unknown pieces map to unk
        return found if self.sp.id_to_piece(found) == token else None

    def token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str | Path, eos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a bad file
            raise PrepError(f"data.tokenizer: {path} is not a Hugging Face tokenizer.json "
                            f"({e})") from None
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self._resolve(eos_token, pad_token, self._first(EOS_CANDIDATES),
                      self._first(PAD_CANDIDATES))
        # Byte-level BPE (GPT-2) spells the space before a word itself; Metaspace models
        # (converted SentencePiece) prefix one as SentencePiece's dummy prefix does.
        joined = self.decode(self.encode("a") + self.encode("b"))
        self._part_prefix = "" if joined == "a b" else " "

    def _first(self, tokens: tuple[str, ...]) -> int | None:
        return next((i for i in map(self.token_id, tokens) if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_part(self, text: str) -> list[int]:
        return self.encode(self._part_prefix + text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)


def load_tokenizer(path: str | Path, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
    """The tokenizer at ``path`` (``is_huggingface`` says which kind), its end-of-document
    and padding tokens those named, else its own."""
    kind = HuggingFaceTokenizer if is_huggingface(path) else SentencePieceTokenizer
    return kind(path, eos_token, pad_token)


def dataset_tokenizer(shards: str | Path, manifest: dict) -> Tokenizer:
    """The tokenizer a prepared data set was made with, with the special tokens it used
    (manifests from before they were recorded: the model's own)."""
    return load_tokenizer(Path(shards) / manifest["tokenizer"], manifest.get("eos_token"),
                          manifest.get("pad_token"))
