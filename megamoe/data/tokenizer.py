"""SentencePiece tokenizer: train one from text, or load a `.model` file."""

from __future__ import annotations

import io
import os


class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise ValueError(f"{path}: tokenizer model not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError
            raise ValueError(f"{path}: not a sentencepiece model ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def train_sentencepiece(texts, model_prefix: str, vocab_size: int) -> SentencePieceTokenizer:
    """Train a BPE model on an iterable of strings; writes `<model_prefix>.model`."""
    import sentencepiece as spm

    buf = io.StringIO()
    for t in texts:
        buf.write(t.replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(buf.getvalue().splitlines()), model_prefix=model_prefix,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2)
    return SentencePieceTokenizer(model_prefix + ".model")
