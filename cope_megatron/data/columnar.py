"""Columnar text sources: parquet files and Arrow files (a ``datasets`` ``save_to_disk``
directory holds the latter), read with pyarrow.

Only the text column (``data.text_field``) is read, one record batch at a time (parquet:
``ParquetFile.iter_batches``, row group by row group; Arrow: the IPC stream or file reader),
so memory stays near one batch whatever the file's size. A null or empty text is skipped
and counted (``skipped``). Rows are documents, or lines joined into documents
(``data.join_rows``, for line-per-row data sets such as WikiText-103):
- ``heading``: a new document at each top-level `` = Title = `` row (one '=' each side;
  `` = = Section = = `` rows stay inside their article);
- ``every_n``: a new document every ``data.join_rows_n`` rows of a file, counted as stored.
Joined rows keep their line ends; a row without one gets one. No document spans two files.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cope_megatron.data.corpus import CorpusError, Piece

BATCH_ROWS = 1024
"""Rows per record batch read from a parquet file."""
READ_BYTES = 1 << 20
PIECE_CHARS = 1 << 20
"""A joined document is passed on in pieces of about this many characters."""
HEADING = re.compile(r" = [^=](.*[^=])? = \n?")


def _arrow_batches(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """``datasets`` writes the IPC stream format; the IPC file format is read too. Read,
    not memory-mapped: the mapped pages of a whole file would count as resident."""
    source = pa.OSFile(str(path))
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _text_batches(path: Path, text_field: str) -> Iterator[list[str | None]]:
    """The text column of ``path``, batch by batch; a missing or non-text column is one
    error naming the file, the column and the columns there are."""
    if path.suffix == ".parquet":
        # pyarrow's default pre_buffer coalesces the reads of every row group asked for, so
        # memory grew with the file (1.1 GiB for a 1 GiB file); unbuffered, it is one
        # row group's column chunk at most, read in READ_BYTES blocks.
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BYTES)
        schema = parquet.schema_arrow
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=[text_field])
    else:
        schema, batches = _arrow_batches(path)
    if text_field not in schema.names:
        raise CorpusError(f"{path}: no column {text_field!r} (data.text_field); its columns "
                          f"are {schema.names}")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {text_field!r} holds {kind}, not text; set "
                          "data.text_field to the text column")
    for batch in batches:
        yield batch.column(text_field).to_pylist()


def _rows(path: Path, text_field: str, skipped: Counter) -> Iterator[tuple[int, str]]:
    """(row number, text) of every row with text; null and empty ones counted in
    ``skipped`` (keys ``null_rows``, ``empty_rows``)."""
    row = 0
    for texts in _text_batches(path, text_field):
        for text in texts:
            if text is None:
                skipped["null_rows"] += 1
            elif not text:
                skipped["empty_rows"] += 1
            else:
                yield row, text
            row += 1


def columnar_pieces(path: Path, text_field: str = "text", join_rows: str = "none",
                    join_rows_n: int | None = None,
                    skipped: Counter | None = None) -> Iterator[Piece]:
    """One parquet or Arrow file's documents, named ``{path}:{first row + 1}``."""
    rows = _rows(path, text_field, Counter() if skipped is None else skipped)
    if join_rows == "none":
        for row, text in rows:
            yield Piece(doc=f"{path}:{row + 1}", text=text, last=True)
        return
    doc, buf = None, []
    size = 0
    for row, text in rows:
        starts = (HEADING.fullmatch(text) is not None if join_rows == "heading"
                  else row // join_rows_n != (doc or 0) // join_rows_n)
        if doc is None or starts:
            if doc is not None:
                yield Piece(doc=f"{path}:{doc + 1}", text="".join(buf), last=True)
            doc, buf, size = row, [], 0
        buf.append(text if text.endswith("\n") else text + "\n")
        size += len(buf[-1])
        if size >= PIECE_CHARS:
            yield Piece(doc=f"{path}:{doc + 1}", text="".join(buf), last=False)
            buf, size = [], 0
    if doc is not None:
        yield Piece(doc=f"{path}:{doc + 1}", text="".join(buf), last=True)
