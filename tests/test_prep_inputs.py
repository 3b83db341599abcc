"""Prep inputs (issue 27): an empty corpus, text that is not UTF-8 and an over-long line
each get their own message, naming the file; "raise data.vocab_size" only when the
vocabulary is the cause."""

import gzip

import pytest

from cope_megatron.data.corpus import (
    CorpusError,
    PrepError,
    _text_blocks,
    check_has_text,
    iter_pieces,
)
from cope_megatron.data.prep.prep import prepare
from cope_megatron.data.tokenizer import train_tokenizer
from tests.helpers import WORDS, small_data


def corpus(tmp_path, texts: dict) -> list:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in texts.items():
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def prep(tmp_path, **changes):
    data = small_data(tmp_path, prep_workers=1, **changes)
    return prepare(data, seq_len=32, seed=7, progress=False)


def words(n: int, sep: str = " ") -> str:
    return sep.join(WORDS[i % len(WORDS)] for i in range(n))


@pytest.mark.parametrize("texts", [{"a.txt": ""}, {"a.txt": "", "b.txt": " \n\n\t\n"},
                                   {"a.jsonl": '{"text": ""}\n\n{"text": "  "}\n'}])
def test_a_corpus_without_text_says_so_naming_its_files(tmp_path, texts):
    corpus(tmp_path, texts)
    with pytest.raises(CorpusError, match=r"no text to prepare: .*a\.(txt|jsonl)") as e:
        prep(tmp_path)
    assert "raise data.vocab_size" not in str(e.value)
    assert not (tmp_path / "shards" / "prep_fingerprint.json").exists()  # fix it, rerun


def test_an_empty_file_among_others_is_named_in_a_warning(tmp_path):
    root = corpus(tmp_path, {"a.txt": "some text\n", "empty.txt": ""})
    with pytest.warns(UserWarning, match=r"empty \(or blank\) inputs: \S+empty\.txt"):
        check_has_text(sorted(root.iterdir()), "text", "strict")


def test_text_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    bad = words(3000).encode() + b" caf\xe9 " + words(10).encode()  # latin-1, past the sniff
    corpus(tmp_path, {"a.txt": words(4000), "latin1.txt": bad})
    with pytest.raises(CorpusError, match=rf"latin1\.txt: not UTF-8 at byte {bad.index(0xe9)} "
                                          r".*data\.decode_errors=replace") as e:
        prep(tmp_path)
    assert "raise data.vocab_size" not in str(e.value)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 4096])
def test_the_offset_is_exact_across_read_blocks(tmp_path, size):
    """Multi-byte characters split over blocks are held by the decoder between reads."""
    data = ("é€𝄞a" * 7).encode() + b"\xff" + "tail".encode()
    (tmp_path / "x.txt").write_bytes(data)
    with pytest.raises(CorpusError, match=rf"byte {data.index(0xff)} "):
        list(_text_blocks(tmp_path / "x.txt", "strict", size))
    (tmp_path / "x.txt.gz").write_bytes(gzip.compress(data))  # decompressed offset
    with pytest.raises(CorpusError, match=rf"x\.txt\.gz: not UTF-8 at byte {data.index(0xff)}"):
        list(_text_blocks(tmp_path / "x.txt.gz", "strict", size))


def test_decode_errors_replace_reads_on(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 au lait\r\nnext")
    assert [p.text for p in iter_pieces(tmp_path / "x.txt", decode_errors="replace")] == [
        "caf\ufffd au lait\nnext"]


def test_a_file_of_over_long_lines_prepares(tmp_path):
    """One 60k-character line per file: SentencePiece used to drop every line as too long
    and fail with "raise data.vocab_size"; lines are now cut for its training sample and
    the text is tokenized whole."""
    texts = {f"doc{i}.txt": words(10_000 + i) for i in range(8)}
    corpus(tmp_path, texts)
    manifest = prep(tmp_path, val_fraction=0.3)
    assert manifest["splits"]["train"]["samples"] > 0
    assert manifest["splits"]["val"]["samples"] > 0


def test_vocab_size_is_blamed_only_when_it_is_the_cause(tmp_path):
    root = corpus(tmp_path, {"a.txt": words(3000, "\n")})
    kw = dict(model_type="bpe", byte_fallback=True, user_symbols=[], sample_bytes=100_000,
              text_field="text")
    with pytest.raises(PrepError, match=r"raise data\.vocab_size"):
        train_tokenizer([root / "a.txt"], tmp_path / "small", vocab_size=100, **kw)
    (root / "blank.txt").write_text("\n \n")
    with pytest.raises(PrepError, match=r"blank\.txt \(no line of text") as e:
        train_tokenizer([root / "blank.txt"], tmp_path / "none", vocab_size=512, **kw)
    assert "raise data.vocab_size" not in str(e.value)
