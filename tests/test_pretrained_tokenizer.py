"""Pretrained tokenizers (data/tokenizer.py): a Hugging Face tokenizer.json and a SentencePiece
model behind one interface, special tokens read or stated, prompts assembled from parts
with either kind, and a small byte-level BPE (trained here with ``tokenizers``) through
prep, training, evaluation and export, where transformers loads the same tokenizer and
gives our logits."""

from __future__ import annotations

import pytest
import torch

from cope_megatron.data.corpus import PrepError
from cope_megatron.data.format import file_sha256
from cope_megatron.data.tokenizer import load_tokenizer, train_tokenizer
from tests.helpers import Ours, debug_overrides, small_data, train_bpe, write_corpus

TEXT = "The world of men.\n  Spaces, new lines and digits 12345 ."


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    write_corpus(root / "corpus", docs=8, words_per_doc=600)
    return root


@pytest.fixture(scope="module")
def bpe(root):
    return train_bpe([p.read_text() for p in sorted((root / "corpus").iterdir())],
                     root / "bpe" / "tokenizer.json")


@pytest.fixture(scope="module")
def metaspace(root):
    return train_bpe([p.read_text() for p in sorted((root / "corpus").iterdir())],
                     root / "metaspace" / "tokenizer.json", metaspace=True)


@pytest.fixture(scope="module")
def sentencepiece(root):
    return train_tokenizer(sorted((root / "corpus").iterdir()), root / "spm", vocab_size=400,
                           model_type="bpe", byte_fallback=True, user_symbols=[],
                           sample_bytes=100_000, text_field="text")


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe", "metaspace"])
def test_both_kinds_keep_one_interface(kind, request):
    tok = load_tokenizer(request.getfixturevalue(kind))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "the world"]) == [ids, tok.encode("the world")]
    assert max(ids) < tok.vocab_size
    if kind == "sentencepiece":
        assert (tok.token(tok.eos_id), tok.pad_id) == ("</s>", None)
    else:
        assert (tok.token(tok.eos_id), tok.token(tok.pad_id)) == ("<|endoftext|>", "<pad>")
    # Parts encoded apart join into words, as in running text (passkey, RULER).
    parts = tok.encode_part("The pass key is") + tok.encode_part("54321")
    assert tok.decode(parts).strip() == "The pass key is 54321"
    assert tok.sha256 == file_sha256(tok.path)


def test_special_tokens_are_read_or_stated(bpe, root):
    tok = load_tokenizer(bpe)
    assert tok.vocab_size == tok.tok.get_vocab_size()
    swapped = load_tokenizer(bpe, eos_token="<pad>", pad_token="<|endoftext|>")
    assert (swapped.eos_id, swapped.pad_id) == (tok.pad_id, tok.eos_id)
    with pytest.raises(PrepError, match=r"data.eos_token: '<nope>' is not a token of"):
        load_tokenizer(bpe, eos_token="<nope>")
    plain = train_bpe(["plain text only"], root / "plain" / "tokenizer.json", specials=())
    with pytest.raises(PrepError, match=r"data.eos_token: .*tokenizer.json has no "
                                        r"end-of-document token"):
        load_tokenizer(plain)
    stated = load_tokenizer(plain, eos_token="t")
    assert stated.eos_id == stated.tok.token_to_id("t") is not None


def test_passkey_and_ruler_prompts_with_a_byte_level_bpe(bpe):
    """GPT-2's kind spells a word's leading space itself: parts get it as SentencePiece's
    dummy prefix gives it."""
    from cope_megatron.eval.passkey import QUESTION, passkey_sample
    from cope_megatron.eval.ruler.prompt import Haystack
    from cope_megatron.eval.ruler.tasks import generate

    tok = load_tokenizer(bpe)
    tokens, mask = passkey_sample(tok, 256, 0.5, 54321)
    assert tok.decode(tokens[1:][mask.bool()].tolist()) == " 54321"
    assert tok.decode(tokens.tolist()).endswith(QUESTION + " 54321")
    sample = generate("niah_single_number", seed=0, tokenizer=tok, length=640, depth=0.5,
                      haystack=Haystack.noise(tok))
    assert len(sample.tokens) == 641
    assert tok.decode(sample.tokens[-sample.answer:]).strip() in sample.references


def test_a_bpe_goes_through_prep_training_eval_and_export(root, bpe, sentencepiece, tmp_path,
                                                          dist_cleanup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cope_megatron.config import ConfigError, load_config
    from cope_megatron.data.prep.prep import prepare
    from cope_megatron.distributed.parallel import destroy_distributed
    from cope_megatron.hf.export import export
    from cope_megatron.train import run_eval, run_train

    tok = load_tokenizer(bpe)
    manifest = prepare(small_data(root, tokenizer=str(bpe), shards=str(tmp_path / "shards")),
                       seq_len=32, seed=7, progress=False)
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["eos_id"],
            manifest["pad_id"]) == ("tokenizer.json", tok.vocab_size, tok.eos_id, tok.pad_id)
    assert manifest["tokenizer_sha256"] == file_sha256(bpe)

    overrides = debug_overrides(tmp_path / "shards", tmp_path / "run", **{
        "train.steps": 2, "model.pe": "cope", "eval.length_multipliers": "[1, 8]",
        "eval.tokens": 128, "eval.passkey_samples": 1, "eval.passkey_depths": "[0.5]"})
    run_train(load_config(overrides), evaluate_after=False)
    destroy_distributed()
    report = run_eval(load_config(overrides))
    assert all(r["ppl"] > 1 for r in report["lengths"].values())
    assert set(report["passkey"][256]) == {"samples", "0.5"}  # the prompt fits 256 tokens
    destroy_distributed()
    # The tokenizer's hash tells data sets apart whatever the tokenizer's kind.
    prepare(small_data(root, tokenizer=str(sentencepiece), shards=str(tmp_path / "other")),
            seq_len=32, seed=7, progress=False)
    with pytest.raises(ConfigError, match=r"another tokenizer than the run's; .*tokenizer.json"):
        run_eval(load_config(overrides + [f"eval.data={tmp_path / 'other'}"]))
    destroy_distributed()

    export(tmp_path / "run", tmp_path / "hf")
    assert file_sha256(tmp_path / "hf" / "tokenizer.json") == file_sha256(bpe)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<pad>")
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == tok.encode(TEXT) and hf_tok.decode(ids) == TEXT
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    assert model.config.eos_token_id == tok.eos_id
    tokens = torch.tensor([ids[:32]])
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    torch.testing.assert_close(got, Ours(tmp_path / "run").logits(tokens), rtol=1e-5,
                               atol=1e-5)
