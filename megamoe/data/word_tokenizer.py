"""A closed word-level vocabulary, for generated text whose every word is known in advance (the
scenes set's captions and questions). Real text keeps the sentencepiece path
(megamoe.data.tokenizer); a closed vocabulary makes every id meaningful and an unknown word a
bug in the generator, so it raises instead of mapping to <unk>.

Ids: the specials <pad> = 0, <bos> = 1, <eos> = 2, <image> = 3 (the placeholder an image token
takes), then the words in the order given. Text is lower-case words separated by single spaces;
punctuation is a word of its own that `decode` attaches to the word before it, so
`decode(encode(t)) == t` for text written that way ("where is the star?").
"""

from __future__ import annotations

import json
import re

SPECIALS = ("<pad>", "<bos>", "<eos>", "<image>")
_MARKS = "?.,:;!"                     # punctuation: a word of its own, attached when written
_WORD = re.compile(rf"[{re.escape(_MARKS)}]|[^\s{re.escape(_MARKS)}]+")
_ATTACHED = re.compile(rf" ([{re.escape(_MARKS)}])")


class WordTokenizer:
    """`encode`/`decode` over the specials plus `words` (ids in that order)."""

    pad_id, bos_id, eos_id, image_id = 0, 1, 2, 3

    def __init__(self, words):
        words = list(words)
        vocab = [*SPECIALS, *words]
        if len(set(vocab)) != len(vocab):
            doubles = sorted({w for w in vocab if vocab.count(w) > 1})
            raise ValueError(f"word tokenizer: words repeated or clashing with the specials: "
                             f"{doubles}")
        bad = [w for w in words if _WORD.fullmatch(w) is None or w != w.lower()
               or w.startswith("<")]
        if bad:
            raise ValueError(f"word tokenizer: {bad[0]!r} is not one lower-case word or mark")
        self.words = tuple(words)
        self._ids = {w: i for i, w in enumerate(vocab)}
        self._vocab = tuple(vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def split(self, text: str) -> list[str]:
        """The words of `text` (punctuation marks are words of their own)."""
        return _WORD.findall(text)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of `text`; ValueError naming the first word outside the vocabulary."""
        out = []
        for word in self.split(text):
            if word not in self._ids:
                raise ValueError(f"word tokenizer: unknown word {word!r} in {text!r}")
            out.append(self._ids[word])
        return out

    def decode(self, ids) -> str:
        """The text of `ids` (specials included by name, e.g. '<bos>')."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"word tokenizer: id {bad[0]} outside [0, {self.vocab_size})")
        return _ATTACHED.sub(r"\1", " ".join(self._vocab[i] for i in ids))

    def question_sequence(self, prompt: str, answer: str, image_tokens: int, seq_length: int,
                          name: str):
        """(tokens int64 [S + 1] = [<bos>, <image> × image_tokens, prompt, answer, <eos>,
        <pad>…], loss_mask float32 [S], 1 where the next token is an answer word or the <eos>)
        of one question; `name` names the sample in the error for a sequence that is too long."""
        import numpy as np

        answer_ids = self.encode(answer)
        ids = [self.bos_id, *[self.image_id] * image_tokens, *self.encode(prompt), *answer_ids,
               self.eos_id]
        if len(ids) > seq_length + 1:
            raise ValueError(f"{name}: {len(ids)} tokens > model.seq_length + 1 = "
                             f"{seq_length + 1}")
        tokens_S1 = np.full(seq_length + 1, self.pad_id, np.int64)
        tokens_S1[:len(ids)] = ids
        loss_mask_S = np.zeros(seq_length, np.float32)
        loss_mask_S[len(ids) - len(answer_ids) - 2:len(ids) - 1] = 1.0
        return tokens_S1, loss_mask_S

    def to_json(self) -> str:
        """The vocabulary as JSON (what an export writes next to the model)."""
        return json.dumps({"type": "megamoe.word_tokenizer", "specials": list(SPECIALS),
                           "words": list(self.words)})

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        data = json.loads(text)
        if data.get("type") != "megamoe.word_tokenizer" or data.get("specials") != list(SPECIALS):
            raise ValueError("word tokenizer JSON: not a megamoe word vocabulary with specials "
                             f"{list(SPECIALS)}")
        return cls(data["words"])

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and other.words == self.words

    def __repr__(self) -> str:
        return f"WordTokenizer({self.vocab_size} ids)"
