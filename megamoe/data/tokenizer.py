"""SentencePiece tokenizer: train a BPE model from text, or load a `.model` file.

Models trained here reserve pad = 0, unk = 1, bos = 2, eos = 3.
"""

from __future__ import annotations

import os
from typing import Iterable


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path}: sentencepiece model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            ok = self.sp.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{self.path}: not a valid sentencepiece model ({exc})") from None
        if ok is False:
            raise ValueError(f"{self.path}: not a valid sentencepiece model")

    @property
    def vocab_size(self) -> int:
        return int(self.sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence piece; −1 if the model has none."""
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        """Id of the padding piece; −1 if the model has none."""
        return int(self.sp.pad_id())

    def encode(self, text):
        """Token ids of one string (list[int]), or of each string of a list (list[list[int]])."""
        return self.sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def train_sentencepiece(text_iter: Iterable[str], model_prefix: str,
                        vocab_size: int) -> SentencePieceTokenizer:
    """Train a BPE model on an iterable of documents; writes `<model_prefix>.model` (and .vocab).

    `vocab_size` is an upper bound: on a small corpus the model may have fewer pieces.
    """
    import sentencepiece as spm

    model_prefix = str(model_prefix)
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be ≥ 8 (4 special pieces plus text), got {vocab_size}")
    count = 0

    def lines():
        nonlocal count
        for text in text_iter:
            for line in text.splitlines():
                if line.strip():
                    count += 1
                    yield line

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=lines(), model_prefix=model_prefix, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as exc:
        if count == 0:
            raise ValueError(f"{model_prefix}.model: no text to train the tokenizer on") from None
        raise ValueError(f"{model_prefix}.model: sentencepiece training failed ({exc})") from None
    return SentencePieceTokenizer(model_prefix + ".model")
