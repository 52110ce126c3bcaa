"""The closed word-level tokenizer: fixed special ids, punctuation as words, exact round trips,
one-line errors naming the unknown word, and a JSON form that reloads to the same vocabulary."""

import json

import pytest

from megamoe.data.word_tokenizer import SPECIALS, WordTokenizer

WORDS = ["where", "is", "the", "red", "star", "?", "top", "left", ",", "and", "."]


def test_specials_come_first_then_the_words_in_order():
    tok = WordTokenizer(WORDS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(SPECIALS) + len(WORDS) == 15
    assert tok.encode("where is the red star?") == [4, 5, 6, 7, 8, 9]
    assert tok.encode("<image> <image> top left") == [3, 3, 10, 11]
    assert tok.split("top left, and the star.") == ["top", "left", ",", "and", "the", "star",
                                                     "."]


@pytest.mark.parametrize("text", ["where is the red star?", "top left, and the red star.",
                                  "the", ""])
def test_round_trip(text):
    tok = WordTokenizer(WORDS)
    assert tok.decode(tok.encode(text)) == text


def test_decode_names_specials_and_refuses_ids_outside():
    tok = WordTokenizer(WORDS)
    assert tok.decode([1, 3, 3, 4, 5, 9, 2, 0]) == "<bos> <image> <image> where is? <eos> <pad>"
    with pytest.raises(ValueError, match=r"^word tokenizer: id 15 outside \[0, 15\)$"):
        tok.decode([4, 15])


def test_unknown_word_is_one_error_naming_it():
    tok = WordTokenizer(WORDS)
    with pytest.raises(ValueError, match=r"^word tokenizer: unknown word 'blue' in "
                                         r"'where is the blue star\?'$"):
        tok.encode("where is the blue star?")
    with pytest.raises(ValueError, match=r"unknown word 'Red'"):   # case matters
        tok.encode("Red")
    with pytest.raises(ValueError, match=r"unknown word '!'"):
        tok.encode("star!")


def test_bad_vocabularies_are_refused():
    with pytest.raises(ValueError, match=r"repeated or clashing with the specials: \['red'\]"):
        WordTokenizer(["red", "star", "red"])
    with pytest.raises(ValueError, match=r"clashing with the specials: \['<pad>'\]"):
        WordTokenizer(["<pad>"])
    with pytest.raises(ValueError, match=r"'two words' is not one lower-case word"):
        WordTokenizer(["two words"])
    with pytest.raises(ValueError, match=r"'Red' is not one lower-case word"):
        WordTokenizer(["Red"])


def test_json_round_trip_keeps_every_id():
    tok = WordTokenizer(WORDS)
    text = tok.to_json()
    again = WordTokenizer.from_json(text)
    assert again == tok and again.encode("the red star?") == tok.encode("the red star?")
    assert json.loads(text)["words"] == WORDS
    assert WordTokenizer.from_json(text.replace('"red"', '"blue"')) != tok   # control
    bad = json.dumps({"type": "megamoe.word_tokenizer", "specials": ["<pad>"], "words": []})
    with pytest.raises(ValueError, match=r"^word tokenizer JSON: not a megamoe word vocabulary"):
        WordTokenizer.from_json(bad)
