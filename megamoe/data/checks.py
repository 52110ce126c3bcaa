"""Checks of the files a run reads, made before any rank starts (the launching process, or each
rank under a launcher before it initialises anything): a missing dataset, tokenizer or resume
checkpoint, or a `model.vocab_size` that cannot hold the tokenizer's pieces, is one line naming
the field and path within a second of start-up, not a rank failure 10-80 s later.

Only what is cheap to know: file existence, and the piece count of a sentencepiece model (it
loads in milliseconds). Deeper checks (the dataset's index, its token ids against the
tokenizer, whether a resume directory holds a complete checkpoint) stay with the readers.
"""

from __future__ import annotations

import os

from megamoe.config.errors import fail

SPECIAL_RESUME = ("auto", "none")


def check_inputs(cfg) -> None:
    """Raise ConfigError for the first input of `cfg` that is missing or does not fit."""
    _check_dataset(cfg.data)
    tokenizer_vocab = _check_tokenizer(cfg.data)
    _check_vocab_size(cfg, tokenizer_vocab)
    _check_resume(cfg.train)


def _check_dataset(data) -> None:
    if data.kind != "indexed":
        return
    for path in (data.path + ".bin", data.path + ".idx"):
        if not os.path.isfile(path):
            fail("data.path", f"{path}: no such file (dataset prefix {data.path!r}; make one "
                 "with tools/preprocess_data.py)")


def _check_tokenizer(data) -> int | None:
    """The tokenizer's piece count, or None when the run has no tokenizer."""
    if not data.tokenizer:
        return None
    from megamoe.data.tokenizer import SentencePieceTokenizer

    if not os.path.isfile(data.tokenizer):
        fail("data.tokenizer", f"{data.tokenizer}: no such file (a sentencepiece .model)")
    try:
        return SentencePieceTokenizer(data.tokenizer).vocab_size
    except ValueError as exc:
        fail("data.tokenizer", str(exc))


def data_vocab_size(cfg, tokenizer_vocab: int | None) -> int | None:
    """The vocabulary the data needs, where it is known without reading the tokens."""
    if cfg.data.kind == "markov":
        return cfg.data.markov_vocab_size
    if cfg.data.kind == "scenes":
        from megamoe.data.scenes import scenes_tokenizer

        return scenes_tokenizer().vocab_size
    if cfg.data.kind == "sounds":
        from megamoe.data.sounds import sounds_tokenizer

        return sounds_tokenizer().vocab_size
    return tokenizer_vocab


def model_vocab_size(cfg, data_vocab: int) -> int:
    """The model's (unpadded) vocabulary: `model.vocab_size`, or the data's when unset;
    ConfigError when it is set smaller than the data's `data_vocab` (ids would not fit)."""
    explicit = cfg.model.vocab_size
    if explicit is None:
        return data_vocab
    if explicit < data_vocab:
        source = ("data.tokenizer" if cfg.data.tokenizer else
                  "data.markov_vocab_size" if cfg.data.kind == "markov" else
                  f"the {cfg.data.kind} word vocabulary" if cfg.data.kind in ("scenes", "sounds")
                  else
                  "the largest token id + 1")
        fail("model.vocab_size", f"{explicit} is smaller than the data's vocabulary "
             f"({data_vocab}, {source}); raise it or leave it unset to take the data's")
    return explicit


def _check_vocab_size(cfg, tokenizer_vocab: int | None) -> None:
    need = data_vocab_size(cfg, tokenizer_vocab)
    if need is not None:
        model_vocab_size(cfg, need)


def _check_resume(train) -> None:
    if train.resume in SPECIAL_RESUME:
        return
    if not os.path.exists(train.resume):
        fail("train.resume", f"{train.resume}: no such file or directory (a run directory, "
             "its checkpoints/ folder or one step directory; or 'auto' / 'none')")
