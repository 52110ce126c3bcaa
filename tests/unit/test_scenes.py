"""The scenes image+text set: each sample a pure function of (seed, global index), captions and
answers that match the scene and its pixels, a loss mask on exactly the answer and <eos>, an
upper bound on sample length that over-long samples are refused against, image-blind baselines
near their hand-computed chance, and config errors naming the field."""

import hashlib
import pathlib
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from megamoe.config import ConfigError, load_config, validate
from megamoe.data.batches import build_datasets
from megamoe.data.scenes import (CAPTION, CELLS, COLOURS, KINDS, NUMBERS, VALID_BASE,
                                 ScenesDataset, blind_accuracy, blind_baselines, caption,
                                 check_seq_length, describe_sample, main, max_sample_length,
                                 render_scene, scenes_tokenizer)

ROOT = pathlib.Path(__file__).resolve().parents[2]
_DIGEST = ("import hashlib, numpy as np; from megamoe.data.scenes import ScenesDataset; "
           "b = ScenesDataset(3, split='valid', num_samples=40, image_tokens=4, seq_length=40)"
           ".get_batch(np.arange(40)); print(hashlib.sha256(b['images'].tobytes() + "
           "b['tokens'].tobytes()).hexdigest())")
PALETTE = np.array(list(COLOURS.values()), float)


def _valid(n=40, **kw):
    return ScenesDataset(3, split="valid", num_samples=n, **{"image_tokens": 4,
                                                              "seq_length": 40, **kw})


def test_same_seed_and_index_same_bytes_in_any_order_and_process():
    data = _valid()
    b = data.get_batch(np.arange(40))
    assert b["images"].shape == (40, 3, 32, 32) and b["images"].dtype == np.uint8
    assert b["tokens"].shape == (40, 41) and b["tokens"].dtype == np.int64
    assert b["loss_mask"].shape == (40, 40) and b["loss_mask"].dtype == np.float32
    assert b["template"].dtype == np.int64 and b["index"].tolist() == list(
        range(VALID_BASE, VALID_BASE + 40))
    assert len(b["prompt_text"]) == len(b["answer_text"]) == 40
    rev = _valid().get_batch(np.arange(40)[::-1])
    for key in ("images", "tokens", "loss_mask", "template"):
        assert np.array_equal(rev[key][::-1], b[key]), key
    one = data[17]
    assert np.array_equal(one["image"], b["images"][17])
    assert np.array_equal(one["tokens"], b["tokens"][17])
    out = subprocess.run([sys.executable, "-c", _DIGEST], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(b["images"].tobytes()
                                                + b["tokens"].tobytes()).hexdigest()
    other = ScenesDataset(4, split="valid", num_samples=40, image_tokens=4,
                          seq_length=40).get_batch(np.arange(40))
    assert (other["images"] != b["images"]).any(axis=(1, 2, 3)).all()
    assert len({x.tobytes() for x in b["images"]}) == 40


def test_splits_are_disjoint_and_do_not_move_when_a_split_grows():
    train, valid, vocab = build_datasets(SimpleNamespace(
        kind="scenes", shapes_seed=5, image_size=32, max_shapes=3, caption_fraction=0.25),
        seq_length=47, seed=0, image_tokens=16)
    assert (len(train), len(valid), vocab) == (1_000_000, 4096, scenes_tokenizer().vocab_size)
    assert valid.describe(0)["index"] == VALID_BASE and train.describe(99)["index"] == 99
    small = ScenesDataset(5, split="valid", num_samples=10, image_tokens=16, seq_length=47)
    assert np.array_equal(small[3]["image"], valid[3]["image"])
    assert np.array_equal(small[3]["tokens"], valid[3]["tokens"])
    assert np.array_equal(valid[3]["image"], render_scene(5, VALID_BASE + 3))
    assert not np.array_equal(valid[3]["image"], train[3]["image"])
    with pytest.raises(IndexError):
        small[10]


def _expected_answer(d: dict) -> str:
    """The answer to d's question, worked out from the scene's shapes alone."""
    shapes, prompt = d["shapes"], d["prompt"]
    if d["template"] == CAPTION:
        return caption(shapes)
    if prompt == "how many shapes are there?":
        return NUMBERS[len(shapes) - 1]
    m = re.fullmatch(r"what colour is the (\w+)\?", prompt)
    if m:
        return next(s["colour"] for s in shapes if s["kind"] == m[1])
    m = re.fullmatch(r"what shape is (\w+)\?", prompt)
    if m:
        (kind,) = [s["kind"] for s in shapes if s["colour"] == m[1]]   # unique, or it fails
        return kind
    m = re.fullmatch(r"where is the (\w+)\?", prompt)
    assert m, prompt
    return next(s["position"] for s in shapes if s["kind"] == m[1])


def _caption_facts(text: str) -> tuple[int, set]:
    """(count word, {(colour, kind, position)}) read back from a caption's words."""
    count, body = text.split(": ")
    facts = set(re.findall(r"a (\w+) (\w+) at the (\w+ \w+)", body))
    return NUMBERS.index(count.split()[0]) + 1, facts


def _cell_colours(image_CHW: np.ndarray) -> list:
    """Per cell of the 2 x 2 grid: the majority palette colour of its saturated pixels, or None
    when it has (almost) none: what the pixels say, independent of the generator's numbers."""
    x_HWC = image_CHW.transpose(1, 2, 0).astype(float)
    sat_HW = x_HWC.max(-1) - x_HWC.min(-1)
    h = image_CHW.shape[1] // 2
    out = []
    for cell in range(4):
        r, c = cell // 2, cell % 2
        block = x_HWC[r * h:(r + 1) * h, c * h:(c + 1) * h][sat_HW[r * h:(r + 1) * h,
                                                                  c * h:(c + 1) * h] > 80]
        if len(block) < 12:
            out.append(None)
            continue
        nearest = np.abs(block[:, None] - PALETTE[None]).sum(-1).argmin(1)
        out.append(list(COLOURS)[np.bincount(nearest, minlength=4).argmax()])
    return out


@pytest.mark.parametrize("max_shapes", [3, 4])
def test_text_and_pixels_match_the_scene(max_shapes):
    data = ScenesDataset(1, split="train", num_samples=300, image_tokens=0,
                         max_shapes=max_shapes, caption_fraction=0.3)
    templates, counts, cells = set(), set(), set()
    for i in range(len(data)):
        d, item = data.describe(i), data[i]
        shapes = d["shapes"]
        assert len({s["kind"] for s in shapes}) == len(shapes) <= max_shapes
        assert len({s["cell"] for s in shapes}) == len(shapes)
        assert (item["prompt_text"], item["answer_text"]) == (d["prompt"], d["answer"])
        assert d["answer"] == _expected_answer(d), (i, d)
        n, facts = _caption_facts(d["caption"])
        assert n == len(shapes)
        assert facts == {(s["colour"], s["kind"], s["position"]) for s in shapes}
        pixels = _cell_colours(item["image"])
        for cell in range(4):
            named = [s["colour"] for s in shapes if s["cell"] == cell]
            assert pixels[cell] == (named[0] if named else None), (i, cell, d["caption"])
        templates.add(d["template"]), counts.add(len(shapes))
        cells.update(s["position"] for s in shapes)
    assert templates == set(range(CAPTION + 1)) and counts == set(range(1, max_shapes + 1))
    assert cells == set(CELLS)


def test_tokens_and_loss_mask_cover_exactly_the_answer_and_eos():
    tok = scenes_tokenizer()
    data = ScenesDataset(2, split="valid", num_samples=200, image_tokens=9, seq_length=60)
    b = data.get_batch(np.arange(200))
    for k in range(200):
        prompt, answer = tok.encode(b["prompt_text"][k]), tok.encode(b["answer_text"][k])
        ids = [tok.bos_id, *[tok.image_id] * 9, *prompt, *answer, tok.eos_id]
        row = b["tokens"][k]
        assert row[:len(ids)].tolist() == ids and (row[len(ids):] == tok.pad_id).all()
        mask = b["loss_mask"][k]
        targets = row[1:][mask == 1].tolist()
        assert targets == [*answer, tok.eos_id] and set(np.unique(mask)) <= {0.0, 1.0}
        assert tok.decode(targets[:-1]) == b["answer_text"][k]
    assert 1 <= min(len(a.split()) for a, t in zip(b["answer_text"], b["template"])
                    if t != CAPTION)
    assert max(len(a.split()) for a, t in zip(b["answer_text"], b["template"]) if t != CAPTION) == 2


@pytest.mark.parametrize("max_shapes, caption_fraction",
                         [(3, 0.25), (1, 0.25), (4, 0.5), (2, 0.0), (3, 1.0)])
def test_max_sample_length_is_the_longest_sample(max_shapes, caption_fraction):
    tok, T = scenes_tokenizer(), 16
    bound = max_sample_length(T, max_shapes, caption_fraction)
    lengths = []
    for g in range(800):
        d = describe_sample(0, g, max_shapes, caption_fraction)
        lengths.append(2 + T + len(tok.encode(d["prompt"])) + len(tok.encode(d["answer"])))
    assert max(lengths) == bound                   # an upper bound, and reached
    check_seq_length(bound - 1, T, max_shapes, caption_fraction)
    with pytest.raises(ConfigError, match=rf"^model\.seq_length: {bound - 2} is too short for "
                                          rf"the scenes data: its longest sample is {bound} "
                                          rf"tokens, so it must be >= {bound - 1} \({T} image"):
        check_seq_length(bound - 2, T, max_shapes, caption_fraction)


def test_default_longest_sample():
    # <bos> + 16 image tokens + "describe the image." (4) + a three-shape caption (26) + <eos>
    assert max_sample_length(16) == 1 + 16 + 4 + 26 + 1 == 48


def test_over_long_sample_is_refused_naming_it():
    need = max_sample_length(4)                            # tokens of the longest sample
    short = ScenesDataset(0, split="valid", num_samples=400, image_tokens=4, seq_length=need - 2)
    lengths = [2 + 4 + len(short.tokenizer.encode(d["prompt"] + " " + d["answer"]))
               for d in map(short.describe, range(400))]
    first = lengths.index(need)
    assert short[first - 1 if lengths[first - 1] < need else 0]["tokens"].shape == (need - 1,)
    message = (rf"^scenes valid sample {first} \(global index {VALID_BASE + first}\): "
               rf"{need} tokens > model\.seq_length \+ 1 = {need - 1}$")
    with pytest.raises(ValueError, match=message):
        short[first]
    with pytest.raises(ValueError, match=message):
        short.get_batch([0, first])


def test_blind_accuracy_hand_computed_and_catches_a_leaky_wording():
    """Negative control for the baselines: when the wording gives the answer away, the
    per-question guess finds it while the per-template guess cannot."""
    q = "what colour is the {}?"
    train = [(0, q.format("circle"), "red")] * 3 + [(0, q.format("star"), "blue")] * 2
    valid = [(0, q.format("circle"), "red"), (0, q.format("star"), "blue"),
             (0, q.format("ring"), "blue"), (2, "how many shapes are there?", "two")]
    assert blind_accuracy(train, valid, 0) == 1 / 4          # "red" for template 0, none for 2
    assert blind_accuracy(train, valid, 1) == 2 / 4          # ring backs off to "red"


def test_blind_baselines_near_chance():
    b = blind_baselines(0, max_shapes=3, caption_fraction=0.25, n_train=2500, n_valid=600)
    # chance by hand: template 1 falls back to 0 when no colour is unique, P = (0 + 1/4 + 1/16)/3
    no_unique = (0 + 1 / 4 + 1 / 16) / 3
    p = [1 / 4 * (1 + no_unique), 1 / 4 * (1 - no_unique), 1 / 4, 1 / 4]
    chance = p[0] / 4 + p[1] / 6 + p[2] / 3 + p[3] / 4         # ≈ 0.252
    assert b["num_questions"] + b["num_captions"] == 600 and 100 < b["num_captions"] < 200
    for key in ("template", "question"):
        assert abs(b[key] - chance) < 0.06 and b[key] < 0.35, (key, b)
    assert abs(b["per_template"]["count"] - 1 / 3) < 0.1
    assert b["caption"] < 0.05
    # in-sample the finer key can only gain: the per-question guess >= the per-template guess
    train = [(d["template"], d["prompt"], d["answer"])
             for d in (describe_sample(0, g) for g in range(1200)) if d["template"] != CAPTION]
    assert blind_accuracy(train, train, 1) >= blind_accuracy(train, train, 0)


@pytest.mark.parametrize("overrides, fragment", [
    (["data.max_shapes=5"], "data.max_shapes: must be in [1, 4], got 5"),
    (["data.max_shapes=0"], "data.max_shapes: must be in [1, 4], got 0"),
    (["data.caption_fraction=1.5"], "data.caption_fraction: must be in [0, 1], got 1.5"),
    (["data.caption_fraction=.nan"], "data.caption_fraction: must be a finite number"),
])
def test_config_errors_name_the_field(overrides, fragment):
    """(The lm family's refusal of data.kind scenes is in test_config.py's ERRORS.)"""
    load_config(None, ["data.max_shapes=4", "data.caption_fraction=1"]).data.validate()
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, overrides))
    assert str(e.value).startswith(fragment), str(e.value)


def test_model_vocab_size_below_the_word_vocabulary_is_refused():
    from megamoe.data.checks import check_inputs

    need = scenes_tokenizer().vocab_size
    check_inputs(load_config(None, ["data.kind=scenes", f"model.vocab_size={need}"]))
    with pytest.raises(ConfigError, match=rf"^model\.vocab_size: {need - 1} is smaller than the "
                                          rf"data's vocabulary \({need}, the scenes word"):
        check_inputs(load_config(None, ["data.kind=scenes", f"model.vocab_size={need - 1}"]))


def test_dataset_errors_name_the_field():
    cfg = SimpleNamespace(kind="scenes", shapes_seed=0, image_size=32, max_shapes=3,
                          caption_fraction=0.25)
    with pytest.raises(ValueError, match=r"^data\.kind: 'scenes' needs the model's image token"):
        build_datasets(cfg, 47, 0)
    with pytest.raises(ConfigError, match=r"^data\.max_shapes: must be an integer in \[1, 4\]"):
        ScenesDataset(max_shapes=7)
    with pytest.raises(ConfigError, match=r"^data\.caption_fraction: must be in \[0, 1\]"):
        ScenesDataset(caption_fraction=-0.5)
    with pytest.raises(ConfigError, match=r"^data\.image_size: must be an integer >= 16"):
        ScenesDataset(image_size=8)


def test_every_word_is_in_the_vocabulary_and_contact_sheet(tmp_path, capsys):
    tok = scenes_tokenizer()
    for kind in KINDS:
        tok.encode(f"what colour is the {kind}? where is the {kind}?")
    out = tmp_path / "grid.png"
    main(["--grid", str(out), "--count", "4", "--columns", "2", "--scale", "2"])
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] == 2 * (64 + 4) + 4
    assert "4 scenes" in capsys.readouterr().out


def test_get_images_are_get_batch_images():
    """The images-only path (megamoe eval's neighbour-image ablation) draws the same pixels."""
    from megamoe.data.scenes import ScenesDataset

    d = ScenesDataset(num_samples=20, image_tokens=4, split="valid")
    idx = [3, 7, 19, 0]
    assert np.array_equal(d.get_images(idx), d.get_batch(idx)["images"])
    assert d.get_images([]).shape == (0, 3, 32, 32)
