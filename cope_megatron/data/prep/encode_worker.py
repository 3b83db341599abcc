"""Tokenizer worker processes for prep. Kept free of heavy imports: each spawned worker
imports only this module and the tokenizer's library."""

from __future__ import annotations

import os

import numpy as np

from cope_megatron.data.tokenizer import Tokenizer, load_tokenizer

_TOK: Tokenizer | None = None


def init(path: str, eos_token: str | None, pad_token: str | None) -> None:
    global _TOK
    # Prep runs one worker per core already: the Rust tokenizer's own thread pool would
    # only oversubscribe them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _TOK = load_tokenizer(path, eos_token, pad_token)


def encode(pieces: list) -> list[tuple[str, np.ndarray, bool, int]]:
    """(document id, token ids, document ends here, text bytes) of each corpus piece."""
    ids = _TOK.encode_batch([p.text for p in pieces])
    # Arrays pickle far faster than lists.
    return [(p.doc, np.asarray(i, dtype=np.uint32), p.last, len(p.text.encode()))
            for p, i in zip(pieces, ids)]
