"""The run's SentencePiece model as a ``transformers`` tokenizer, shipped beside exported
weights (``trust_remote_code=True``). It encodes and decodes exactly as the SentencePiece
model does during prep: no added BOS or EOS, no text normalization of its own; documents
were separated by SentencePiece's EOS (id 2) in training."""

from __future__ import annotations

import shutil
from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class CopeMegatronTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs) -> None:
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("eos_token", self.sp.id_to_piece(self.sp.eos_id()))
        kwargs.setdefault("unk_token", self.sp.id_to_piece(self.sp.unk_id()))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece's text, with special tokens kept as written (SentencePiece would
        drop them: decoding ``</s>`` alone gives "", which a harness takes for a stop
        sequence found at once); ``skip_special_tokens`` drops them before this."""
        special, text, run = set(self.all_special_tokens), [], []
        for token in tokens:
            if token in special:
                text += [self.sp.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        return "".join(text) + self.sp.decode_pieces(run)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None
                        ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        target = Path(save_directory) / name
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)
