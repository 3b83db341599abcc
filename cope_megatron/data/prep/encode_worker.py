"""Tokenizer worker processes for prep. Kept free of heavy imports: each spawned worker
imports only this module and SentencePiece."""

from __future__ import annotations

import numpy as np
import sentencepiece as spm

_SP: spm.SentencePieceProcessor | None = None


def init(model_path: str) -> None:
    global _SP
    _SP = spm.SentencePieceProcessor(model_file=model_path)


def encode(piece) -> tuple[str, np.ndarray, bool, int]:
    """(document id, token ids, document ends here, text bytes) of one corpus piece."""
    ids = np.asarray(_SP.encode(piece.text), dtype=np.uint32)  # pickles far faster than a list
    return piece.doc, ids, piece.last, len(piece.text.encode())
