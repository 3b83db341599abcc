"""Parquet and Arrow corpora (data/columnar.py): FineWeb-like files read by row group with
null and empty texts skipped and counted, a missing column named with the columns there
are, WikiText-style rows joined into documents, ``datasets`` save_to_disk directories, and
prep giving the very shards it gives for the same text as JSONL."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cope_megatron.data.corpus import CorpusError, iter_pieces, resolve_sources
from tests.helpers import WORDS, small_data, train_bpe, write_corpus


def fineweb_table(texts: list[str | None], first_id: int = 0) -> pa.Table:
    n = len(texts)
    return pa.table({
        "text": pa.array(texts, pa.string()),
        "id": [f"<urn:uuid:{first_id + i}>" for i in range(n)],
        "url": [f"https://example.org/{first_id + i}" for i in range(n)],
        "token_count": pa.array([len((t or "").split()) for t in texts], pa.int64()),
    })


def documents(count: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 200))).capitalize()
            + ".\nA second line.\n" for _ in range(count)]


def test_rows_are_documents_read_row_group_by_row_group(tmp_path):
    texts = documents(10)
    rows = texts[:4] + [None] + texts[4:7] + [""] + texts[7:]
    path = tmp_path / "train-00000.parquet"
    pq.write_table(fineweb_table(rows), path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    skipped = Counter()
    pieces = list(iter_pieces(path, skipped=skipped))
    assert [p.text for p in pieces] == texts and all(p.last for p in pieces)
    rows_of_texts = [i + 1 for i, t in enumerate(rows) if t]
    assert [p.doc for p in pieces] == [f"{path}:{i}" for i in rows_of_texts]
    assert skipped == {"null_rows": 1, "empty_rows": 1}
    pq.write_table(fineweb_table(texts[:2]), tmp_path / "train-00001.parquet")
    (tmp_path / "notes.txt").write_text("not matched")
    assert resolve_sources([str(tmp_path / "train-*.parquet")], tmp_path) == [
        path, tmp_path / "train-00001.parquet"]


def test_a_missing_column_is_one_error_naming_file_column_and_columns(tmp_path):
    from cope_megatron.data.prep.prep import prepare

    path = tmp_path / "corpus" / "part.parquet"
    path.parent.mkdir()
    pq.write_table(fineweb_table(documents(3)), path)
    data = small_data(tmp_path, text_field="content")
    with pytest.raises(CorpusError) as err:
        prepare(data, seq_len=32, seed=0, progress=False)
    assert str(err.value) == (f"{path}: no column 'content' (data.text_field); its columns "
                              "are ['text', 'id', 'url', 'token_count']")
    pq.write_table(pa.table({"content": [1, 2]}), path)
    with pytest.raises(CorpusError, match="column 'content' holds int64, not text"):
        list(iter_pieces(path, "content"))


WIKITEXT = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a game .\n",
            " = = Gameplay = = \n", "", " As with previous games .\n", None,
            " = Tower Building = \n", " The building stands .\n"]


def test_heading_rows_start_documents_and_section_headings_do_not(tmp_path):
    path = tmp_path / "wikitext.parquet"
    pq.write_table(pa.table({"text": pa.array(WIKITEXT, pa.string())}), path, row_group_size=4)
    skipped = Counter()
    pieces = list(iter_pieces(path, join_rows="heading", skipped=skipped))
    assert [(p.doc.rsplit(":", 1)[1], p.text, p.last) for p in pieces] == [
        ("2", " = Valkyria Chronicles III = \n Senjō no Valkyria 3 is a game .\n"
              " = = Gameplay = = \n As with previous games .\n", True),
        ("9", " = Tower Building = \n The building stands .\n", True)]
    assert skipped == {"empty_rows": 3, "null_rows": 1}


def test_every_n_rows_make_a_document_and_rows_get_line_ends(tmp_path):
    path = tmp_path / "lines.parquet"
    rows = [f"line {i}" for i in range(7)]
    rows[4] = None
    pq.write_table(pa.table({"text": rows}), path, row_group_size=2)
    pieces = list(iter_pieces(path, join_rows="every_n", join_rows_n=3))
    assert [(p.doc.rsplit(":", 1)[1], p.text) for p in pieces] == [
        ("1", "line 0\nline 1\nline 2\n"), ("4", "line 3\nline 5\n"), ("7", "line 6\n")]


def test_join_rows_n_goes_with_every_n(tmp_path):
    from cope_megatron.config import ConfigError, load_config, validate

    for bad in (["data.join_rows=every_n"], ["data.join_rows_n=4"],
                ["data.join_rows=every_n", "data.join_rows_n=0"]):
        with pytest.raises(ConfigError, match="data.join_rows_n"):
            validate(load_config(bad))


def save_to_disk(directory, tables: list[pa.Table], file_format: bool = False) -> None:
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow IPC streams and state.json."""
    directory.mkdir(parents=True)
    # Named against their order, which state.json alone gives.
    names = [f"data-{i:05d}-of-{len(tables):05d}.arrow" for i in reversed(range(len(tables)))]
    for name, table in zip(names, tables):
        new = pa.ipc.new_file if file_format else pa.ipc.new_stream
        with new(directory / name, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
    (directory / "dataset_info.json").write_text("{}")
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_split": "train"}))


@pytest.mark.parametrize("file_format", [False, True])
def test_a_saved_dataset_directory_reads_its_arrow_files_in_order(tmp_path, file_format):
    texts = documents(7)
    saved = tmp_path / "saved"
    save_to_disk(saved, [fineweb_table(texts[:4]), fineweb_table(texts[4:] + [None], 4)],
                 file_format)
    files = resolve_sources([str(saved)], tmp_path)
    assert [f.name for f in files] == ["data-00001-of-00002.arrow", "data-00000-of-00002.arrow"]
    skipped = Counter()
    assert [p.text for f in files for p in iter_pieces(f, skipped=skipped)] == texts
    assert skipped == {"null_rows": 1}
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(CorpusError, match="saved DatasetDict; give one of its splits"):
        resolve_sources([str(tmp_path / "dict")], tmp_path)


def test_prep_of_parquet_gives_the_shards_of_the_same_text_as_jsonl(tmp_path, monkeypatch,
                                                                     capsys):
    """Documents are split by name (file and row), and the names differ only in their
    suffix: the split is made a function of the row number, so that both preps put the
    same documents in the same split."""
    import cope_megatron.data.prep.prep as prep
    from cope_megatron.cli import main
    from cope_megatron.data.format import read_manifest

    monkeypatch.setattr(prep, "is_validation",
                        lambda doc, seed, fraction: int(doc.rsplit(":", 1)[1]) % 4 == 0)
    write_corpus(tmp_path / "text", docs=2, words_per_doc=600)
    tokenizer = train_bpe([p.read_text() for p in (tmp_path / "text").iterdir()],
                          tmp_path / "bpe" / "tokenizer.json")
    texts = documents(24, seed=1)
    for kind in ("parquet", "jsonl"):
        (tmp_path / kind).mkdir()
    for name, part in (("a", texts[:14]), ("b", texts[14:])):
        # Null and empty rows last: the text rows keep the line numbers of the JSONL.
        pq.write_table(fineweb_table(part + [None, ""]), tmp_path / "parquet" / f"{name}.parquet",
                       row_group_size=5)
        (tmp_path / "jsonl" / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(part)))
    data = small_data(tmp_path, corpus=[str(tmp_path / "jsonl")], tokenizer=str(tokenizer),
                      shards=str(tmp_path / "shards-jsonl"), prep_workers=1)
    jsonl = prep.prepare(data, seq_len=32, seed=0, progress=False)
    assert main(["prep", f"data.corpus=[{tmp_path / 'parquet'}]", f"data.tokenizer={tokenizer}",
                 f"data.shards={tmp_path / 'shards-parquet'}", "data.prep_workers=1",
                 f"data.shard_max_bytes={data.shard_max_bytes}",
                 "model.seq_length=32", "logging.progress=false"]) == 0
    assert capsys.readouterr().out.endswith("; rows without text skipped: 2 null, 2 empty\n")
    parquet = read_manifest(tmp_path / "shards-parquet")
    assert parquet["splits"] == jsonl["splits"]  # shard names, sample counts and sha256s
    assert parquet["splits"]["val"]["documents"] == 5  # rows 4, 8, 12 of a; 4, 8 of b
    assert parquet["skipped_rows"] == {"null_rows": 2, "empty_rows": 2}
    assert jsonl["skipped_rows"] == {}
