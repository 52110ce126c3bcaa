"""The scenes image+text set: procedural RGB scenes of one to four coloured shapes, each with a
caption or a closed-answer question about it, for the multimodal (`vlm`) family.

Scene. The image is split into a 2 × 2 grid of cells, read as "top left", "top right",
"bottom left", "bottom right". A scene holds n ∈ {1 … max_shapes} shapes (n uniform), of
distinct kinds (drawn without replacement from the shapes set's six), in distinct cells (drawn
without replacement), each with a colour drawn independently from the shapes set's four. A
shape stays inside its cell (circumradius r ∈ [0.34, 0.47] · cell side, centre uniform such
that it fits, rotation uniform), so shapes never overlap and every position word is exact.
Drawing (background, colour jitter, anti-aliasing, pixel noise) is megamoe.data.shapes's.

Text. A sample is a caption with probability `caption_fraction`, else a question from one of
four templates (uniform):
    0 colour_of_kind  "what colour is the {kind}?"  → a colour         (a kind in the scene)
    1 kind_of_colour  "what shape is {colour}?"     → a kind           (a colour held by one
                                                      shape only; else template 0 is asked)
    2 count           "how many shapes are there?"  → one … four
    3 where_is_kind   "where is the {kind}?"        → "top left" … "bottom right"
    4 caption         "describe the image."         → "two shapes: a red circle at the top
                                                      left and a blue star at the bottom right"
Captions list the shapes in reading order of their cells, so a scene has exactly one caption.
Image-blind, every answer is uniform given the question text (colours independent of kinds,
cells uniform, counts uniform; the template-0 fallback happens only when every shape has one
colour, which is symmetric in the colour): the best blind accuracy is about 1/4, 1/6, 1/n and
1/4 per template (`blind_baselines` measures it).

Determinism. Sample g is a pure function of (seed, g): the scene, its text and its pixels draw
from three generators `numpy.random.default_rng([seed, g, stream])`, so the text of a sample is
known without drawing it. Train sample i is global index i, validation sample i is global index
VALID_BASE + i (as in megamoe.data.shapes).

Sequence. tokens = [<bos>, <image> × image_tokens, prompt words, answer words, <eos>, <pad> …],
length seq_length + 1; a model reads tokens[:, :-1] and predicts tokens[:, 1:]; `loss_mask` is
aligned with tokens[:, 1:] and is 1 exactly at the answer words and the <eos>. A sample longer
than seq_length + 1 is refused (ValueError naming it); `max_sample_length` is the longest any
sample can be, for the config check (`check_seq_length`).

    batch = ScenesDataset(seed, 32, "train", 1000, scenes_tokenizer(), 16, 48).get_batch(idx)
    batch["images"] uint8 [B, 3, H, W]; batch["tokens"] int64 [B, S + 1];
    batch["loss_mask"] float32 [B, S]; batch["template"] int64 [B] (0 … 4 as above);
    batch["index"] int64 [B] (global indices); batch["prompt_text"], batch["answer_text"] lists;
    batch["caption_tokens"] int64 [B, L] ([<bos>, caption, <eos>, <pad>…] of every sample's
    scene, whatever it asks), batch["caption_end"] int64 [B] (the <eos> position)

    python -m megamoe.data.scenes --grid out.png     # a contact sheet with each scene's caption

Legend: B batch, S seq_length, T image tokens, C = 3 channels, H, W image side.
"""

from __future__ import annotations

import argparse
import textwrap
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megamoe.config.errors import ConfigError, fail
from megamoe.config.vision import SCENES_MAX_SHAPES
from megamoe.data.shapes import (COLOUR_NAMES, COLOURS, KINDS, VALID_BASE, GeneratedSplit,
                                 check_patch_grid, interp_matrix, shape_alpha,
                                 textured_background)
from megamoe.data.word_tokenizer import WordTokenizer

CELLS = ("top left", "top right", "bottom left", "bottom right")   # cell c: row c // 2, col c % 2
MAX_SHAPES = len(CELLS)
assert MAX_SHAPES == SCENES_MAX_SHAPES       # the config's check (data.max_shapes) uses that one
NUMBERS = ("one", "two", "three", "four")
TEMPLATES = ("colour_of_kind", "kind_of_colour", "count", "where_is_kind", "caption")
CAPTION = TEMPLATES.index("caption")
CAPTION_PROMPT = "describe the image."
WORDS = ("what", "colour", "is", "the", "shape", "shapes", "how", "many", "are", "there",
         "where", "describe", "image", "a", "at", "and", "top", "bottom", "left", "right",
         *NUMBERS, *KINDS, *COLOUR_NAMES, "?", ".", ",", ":")
_RADIUS = (0.34, 0.47)           # circumradius r / cell side
_JITTER = 25                     # ± per colour channel
_NOISE = 6.0                     # pixel noise σ
_SCENE, _TEXT, _PIXELS = 1, 2, 3  # generator streams of one sample
_SPLITS = ("train", "valid")


def scenes_tokenizer() -> WordTokenizer:
    """The closed vocabulary of the scenes set: every word a caption or question can use."""
    return WordTokenizer(WORDS)


def check_scene_options(max_shapes: int, caption_fraction: float) -> None:
    """One error naming the field when the generator cannot make these scenes."""
    if not isinstance(max_shapes, int) or not 1 <= max_shapes <= MAX_SHAPES:
        raise ConfigError(f"data.max_shapes: must be an integer in [1, {MAX_SHAPES}] (one shape "
                          f"per cell of a 2 x 2 grid), got {max_shapes!r}")
    if not 0.0 <= caption_fraction <= 1.0:
        raise ConfigError(f"data.caption_fraction: must be in [0, 1], got {caption_fraction!r}")


# ---- what a sample shows and says ---------------------------------------------------------------

def _scene(seed: int, index: int, max_shapes: int, image_size: int) -> list[dict]:
    """The shapes of scene `index`, in reading order of their cells."""
    rng = np.random.default_rng([seed, index, _SCENE])
    n = int(rng.integers(1, max_shapes + 1))
    kinds = rng.choice(len(KINDS), size=n, replace=False)
    cells = rng.choice(len(CELLS), size=n, replace=False)
    colours = rng.integers(len(COLOURS), size=n)
    side = image_size / 2
    shapes = []
    for kind, cell, colour in zip(kinds.tolist(), cells.tolist(), colours.tolist()):
        r = float(rng.uniform(*_RADIUS) * side)
        x0, y0 = (cell % 2) * side, (cell // 2) * side
        cx, cy = (float(v) for v in rng.uniform(r, side - r, size=2))
        shapes.append({"kind": KINDS[kind], "colour": COLOUR_NAMES[colour], "cell": cell,
                       "position": CELLS[cell], "radius": r, "center": (x0 + cx, y0 + cy),
                       "angle": float(rng.uniform(0.0, 2 * np.pi))})
    return sorted(shapes, key=lambda s: s["cell"])


def caption(shapes: list[dict]) -> str:
    """The caption of a scene: count, then each shape's colour, kind and cell in reading order."""
    n = len(shapes)
    parts = [f"a {s['colour']} {s['kind']} at the {s['position']}" for s in shapes]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS[n - 1]} shape{'s' if n > 1 else ''}: {listed}"


def _text(rng: np.random.Generator, shapes: list[dict],
          caption_fraction: float) -> tuple[int, str, str]:
    """(template id, prompt, answer) of one sample (templates in the module docstring)."""
    if rng.random() < caption_fraction:
        return CAPTION, CAPTION_PROMPT, caption(shapes)
    template = int(rng.integers(CAPTION))
    colours = Counter(s["colour"] for s in shapes)
    unique = [s for s in shapes if colours[s["colour"]] == 1]
    if template == 1 and not unique:
        template = 0
    if template == 0:
        s = shapes[int(rng.integers(len(shapes)))]
        return template, f"what colour is the {s['kind']}?", s["colour"]
    if template == 1:
        s = unique[int(rng.integers(len(unique)))]
        return template, f"what shape is {s['colour']}?", s["kind"]
    if template == 2:
        return template, "how many shapes are there?", NUMBERS[len(shapes) - 1]
    s = shapes[int(rng.integers(len(shapes)))]
    return template, f"where is the {s['kind']}?", s["position"]


def describe_sample(seed: int, index: int, max_shapes: int = 3, caption_fraction: float = 0.25,
                    image_size: int = 32) -> dict:
    """What global sample `index` shows and says, without drawing it: its shapes (kind, colour,
    cell, position words, radius, centre (x, y) and angle, in pixels/radians), template id,
    prompt, answer and the scene's caption."""
    shapes = _scene(seed, index, max_shapes, image_size)
    template, prompt, answer = _text(np.random.default_rng([seed, index, _TEXT]), shapes,
                                     caption_fraction)
    return {"index": index, "shapes": shapes, "template": template, "prompt": prompt,
            "answer": answer, "caption": caption(shapes)}


def render_scene(seed: int, index: int, max_shapes: int = 3, image_size: int = 32, *,
                 _interp=None, _shapes=None) -> np.ndarray:
    """Image uint8 [3, H, W] of global sample `index`; a pure function of its arguments."""
    shapes = _scene(seed, index, max_shapes, image_size) if _shapes is None else _shapes
    rng = np.random.default_rng([seed, index, _PIXELS])
    interp = interp_matrix(image_size, 4) if _interp is None else _interp
    img_CHW = textured_background(rng, image_size, interp)
    for s in shapes:
        colour_C = np.asarray(COLOURS[s["colour"]], float) + rng.uniform(-_JITTER, _JITTER, 3)
        alpha_HW = shape_alpha(s["kind"], image_size, *s["center"], s["radius"], s["angle"])
        img_CHW = img_CHW * (1 - alpha_HW) + colour_C[:, None, None] * alpha_HW
    img_CHW += rng.normal(0.0, _NOISE, size=img_CHW.shape)
    return np.clip(np.rint(img_CHW), 0, 255).astype(np.uint8)


# ---- sequence lengths -----------------------------------------------------------------------------

def max_sample_length(image_tokens: int, max_shapes: int = 3,
                      caption_fraction: float = 0.25) -> int:
    """The longest sample (tokens incl. <bos>, image tokens and <eos>) these options can make."""
    check_scene_options(max_shapes, caption_fraction)
    tok = scenes_tokenizer()
    words = []
    if caption_fraction < 1:             # questions: every template with its longest filling
        words += [len(tok.encode(f"what colour is the {k}?")) + 1 for k in KINDS]
        words += [len(tok.encode(f"what shape is {c}?")) + 1 for c in COLOUR_NAMES]
        words += [len(tok.encode("how many shapes are there?")) + 1]
        words += [len(tok.encode(f"where is the {k}?")) + len(tok.encode(p))
                  for k in KINDS for p in CELLS]
    if caption_fraction > 0:             # captions: the word count depends on n only
        dummy = [{"colour": COLOUR_NAMES[0], "kind": KINDS[0], "position": CELLS[0]}] * max_shapes
        words += [len(tok.encode(CAPTION_PROMPT)) + len(tok.encode(caption(dummy)))]
    return 1 + image_tokens + max(words) + 1


def caption_length(max_shapes: int, tokenizer: WordTokenizer | None = None) -> int:
    """Tokens of the longest caption these options make, with <bos> and <eos> (captions of n
    shapes all have the same word count)."""
    tok = scenes_tokenizer() if tokenizer is None else tokenizer
    dummy = [{"colour": COLOUR_NAMES[0], "kind": KINDS[0], "position": CELLS[0]}] * max_shapes
    return len(tok.encode(caption(dummy))) + 2


def check_seq_length(seq_length: int, image_tokens: int, max_shapes: int = 3,
                     caption_fraction: float = 0.25) -> None:
    """ConfigError naming `model.seq_length` when the longest scenes sample does not fit
    (tokens are seq_length + 1 long: the model reads all but the last)."""
    need = max_sample_length(image_tokens, max_shapes, caption_fraction) - 1
    if seq_length < need:
        fail("model.seq_length", f"{seq_length} is too short for the scenes data: its longest "
             f"sample is {need + 1} tokens, so it must be >= {need} ({image_tokens} image "
             f"tokens, data.max_shapes {max_shapes}, data.caption_fraction {caption_fraction})")


# ---- the dataset ----------------------------------------------------------------------------------

class ScenesDataset(GeneratedSplit):
    """One split of the scenes set: `num_samples` samples, random access (module docstring)."""

    kind = "scenes"

    def __init__(self, seed: int = 0, image_size: int = 32, split: str = "train",
                 num_samples: int = 1_000_000, tokenizer: WordTokenizer | None = None,
                 image_tokens: int = 16, seq_length: int | None = None, max_shapes: int = 3,
                 caption_fraction: float = 0.25):
        check_patch_grid(image_size)
        check_scene_options(max_shapes, caption_fraction)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if not 1 <= num_samples <= VALID_BASE:
            raise ValueError(f"num_samples must be in [1, 2**40], got {num_samples}")
        if not isinstance(image_tokens, int) or image_tokens < 0:
            raise ValueError(f"image_tokens must be an integer >= 0, got {image_tokens!r}")
        self.seed, self.image_size, self.split = seed, image_size, split
        self.num_samples = num_samples
        self.tokenizer = scenes_tokenizer() if tokenizer is None else tokenizer
        self.image_tokens, self.max_shapes = image_tokens, max_shapes
        self.caption_fraction = caption_fraction
        self.seq_length = (max_sample_length(image_tokens, max_shapes, caption_fraction) - 1
                           if seq_length is None else seq_length)
        self._base = 0 if split == "train" else VALID_BASE
        self._interp = interp_matrix(image_size, 4)
        self.caption_length = caption_length(max_shapes, self.tokenizer)

    def describe(self, i: int) -> dict:
        """Shapes, template, prompt, answer and caption of split sample `i` (describe_sample)."""
        return describe_sample(self.seed, self.global_index(i), self.max_shapes,
                               self.caption_fraction, self.image_size)

    def sequence(self, d: dict) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 [S + 1], loss_mask float32 [S]) of a described sample."""
        return self.tokenizer.question_sequence(
            d["prompt"], d["answer"], self.image_tokens, self.seq_length,
            f"scenes {self.split} sample {d['index'] - self._base} (global index {d['index']})")

    def caption_sequence(self, d: dict) -> tuple[np.ndarray, int]:
        """(tokens int64 [caption_length] = [<bos>, caption words, <eos>, <pad>…], position of
        the <eos>): the scene's caption as text alone, whatever the sample asks (the text side
        of the vlm family's contrastive loss)."""
        tok = self.tokenizer
        ids = [tok.bos_id, *tok.encode(d["caption"]), tok.eos_id]
        out = np.full(self.caption_length, tok.pad_id, np.int64)
        out[:len(ids)] = ids
        return out, len(ids) - 1

    def __getitem__(self, i: int) -> dict:
        d = self.describe(i)
        tokens_S1, loss_mask_S = self.sequence(d)
        caption_L, caption_end = self.caption_sequence(d)
        image_CHW = render_scene(self.seed, d["index"], self.max_shapes, self.image_size,
                                 _interp=self._interp, _shapes=d["shapes"])
        return {"image": image_CHW, "tokens": tokens_S1, "loss_mask": loss_mask_S,
                "template": d["template"], "index": d["index"], "prompt_text": d["prompt"],
                "answer_text": d["answer"], "caption_tokens": caption_L,
                "caption_end": caption_end}

    def get_images(self, indices) -> np.ndarray:
        """uint8 [B, 3, H, W]: the images alone of split samples `indices` (no text)."""
        H = self.image_size
        images = [render_scene(self.seed, self.global_index(int(i)), self.max_shapes, H,
                               _interp=self._interp) for i in np.asarray(indices).reshape(-1)]
        return np.stack(images) if images else np.zeros((0, 3, H, H), np.uint8)

    def get_batch(self, indices) -> dict:
        """The batch of split samples `indices`: arrays stacked on a leading B (module docstring)."""
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        H = self.image_size
        return {
            "images": np.stack([x["image"] for x in items]) if items
            else np.zeros((0, 3, H, H), np.uint8),
            "tokens": np.stack([x["tokens"] for x in items]) if items
            else np.zeros((0, self.seq_length + 1), np.int64),
            "loss_mask": np.stack([x["loss_mask"] for x in items]) if items
            else np.zeros((0, self.seq_length), np.float32),
            "template": np.array([x["template"] for x in items], np.int64),
            "index": np.array([x["index"] for x in items], np.int64),
            "prompt_text": [x["prompt_text"] for x in items],
            "answer_text": [x["answer_text"] for x in items],
            "caption_tokens": np.stack([x["caption_tokens"] for x in items]) if items
            else np.zeros((0, self.caption_length), np.int64),
            "caption_end": np.array([x["caption_end"] for x in items], np.int64),
        }


def build_scenes_datasets(data_cfg, image_tokens: int, seq_length: int,
                          num_train: int = 1_000_000, num_valid: int = 4096):
    """(train, valid, vocab_size): the two splits of the scenes set for `data_cfg` (the
    DataConfig fields shapes_seed, image_size, max_shapes, caption_fraction)."""
    common = dict(seed=data_cfg.shapes_seed, image_size=data_cfg.image_size,
                  tokenizer=scenes_tokenizer(), image_tokens=image_tokens, seq_length=seq_length,
                  max_shapes=data_cfg.max_shapes, caption_fraction=data_cfg.caption_fraction)
    train = ScenesDataset(split="train", num_samples=num_train, **common)
    valid = ScenesDataset(split="valid", num_samples=num_valid, **common)
    return train, valid, train.tokenizer.vocab_size


# ---- image-blind baselines ------------------------------------------------------------------------

def _majority(counts: Counter) -> str:
    """The most frequent key; ties go to the smallest, so the choice is deterministic."""
    return min(counts, key=lambda k: (-counts[k], k))


def blind_accuracy(train: list[tuple], valid: list[tuple], key: int) -> float:
    """Accuracy on `valid` of the majority answer per `item[key]` learned on `train`, backing off
    to the majority per template (item[0]) for keys never seen. Items: (template, prompt,
    answer)."""
    by_key: dict = {}
    by_template: dict = {}
    for item in train:
        by_key.setdefault(item[key], Counter())[item[2]] += 1
        by_template.setdefault(item[0], Counter())[item[2]] += 1
    hits = 0
    for item in valid:
        counts = by_key.get(item[key]) or by_template.get(item[0])
        hits += counts is not None and _majority(counts) == item[2]
    return hits / max(len(valid), 1)


def blind_baselines(seed: int = 0, image_size: int = 32, max_shapes: int = 3,
                    caption_fraction: float = 0.25, n_train: int = 20_000,
                    n_valid: int = 2_000) -> dict:
    """The best image-blind scores on the first `n_valid` validation samples, learned from the
    first `n_train` training samples (text only: nothing is drawn).

    template: accuracy over the questions of the majority answer per question template;
    question: of the majority answer per exact question text (the stronger guess when an answer
    leaks through the wording); per_template: the template guess's accuracy per template;
    caption: exact match of the most frequent training caption on the validation captions.
    `megamoe eval` reports max(template, question) as `chance`."""
    def items(base: int, n: int) -> list[tuple]:
        out = []
        for g in range(base, base + n):
            d = describe_sample(seed, g, max_shapes, caption_fraction, image_size)
            out.append((d["template"], d["prompt"], d["answer"]))
        return out

    train, valid = items(0, n_train), items(VALID_BASE, n_valid)
    q_train = [x for x in train if x[0] != CAPTION]
    q_valid = [x for x in valid if x[0] != CAPTION]
    c_train = [x for x in train if x[0] == CAPTION]
    c_valid = [x for x in valid if x[0] == CAPTION]
    per_template = {TEMPLATES[t]: blind_accuracy(q_train, [x for x in q_valid if x[0] == t], 0)
                    for t in range(CAPTION) if any(x[0] == t for x in q_valid)}
    return {"template": blind_accuracy(q_train, q_valid, 0),
            "question": blind_accuracy(q_train, q_valid, 1),
            "per_template": per_template,
            "caption": blind_accuracy(c_train, c_valid, 1),
            "num_questions": len(q_valid), "num_captions": len(c_valid)}


# ---- contact sheet --------------------------------------------------------------------------------

def contact_sheet(dataset: ScenesDataset, count: int = 24, columns: int = 6,
                  scale: int = 4) -> Image.Image:
    """A grid of the first `count` images of `dataset` (nearest upscaled), each with its scene's
    caption and its own prompt → answer written below it."""
    side, pad, line = dataset.image_size * scale, 4, 11
    font = ImageFont.load_default()
    width = max(side // 6, 12)                        # characters per line of the default font
    tiles = []
    for i in range(min(count, len(dataset))):
        d = dataset.describe(i)
        text = textwrap.wrap(d["caption"], width)
        if d["template"] != CAPTION:
            text += textwrap.wrap(f"{d['prompt']} -> {d['answer']}", width)
        tiles.append((render_scene(dataset.seed, d["index"], dataset.max_shapes,
                                   dataset.image_size), text))
    text_h = line * max(len(t) for _, t in tiles)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (image_CHW, text) in enumerate(tiles):
        x = pad + (k % columns) * (side + pad)
        y = pad + (k // columns) * (side + text_h + pad)
        tile = Image.fromarray(np.ascontiguousarray(image_CHW.transpose(1, 2, 0)))
        sheet.paste(tile.resize((side, side), Image.NEAREST), (x, y))
        for j, words in enumerate(text):
            draw.text((x, y + side + j * line), words, fill=(0, 0, 0), font=font)
    return sheet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m megamoe.data.scenes",
                                 description="Write a contact sheet of scenes with their text.")
    ap.add_argument("--grid", required=True, help="output PNG path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--max-shapes", type=int, default=3)
    ap.add_argument("--caption-fraction", type=float, default=0.25)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--columns", type=int, default=6)
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args(argv)
    data = ScenesDataset(args.seed, args.image_size, "train", max(args.count, 1),
                         max_shapes=args.max_shapes, caption_fraction=args.caption_fraction)
    contact_sheet(data, args.count, args.columns, args.scale).save(args.grid, format="PNG")
    print(f"wrote {args.grid}: {min(args.count, len(data))} scenes, caption and prompt -> "
          "answer under each")


if __name__ == "__main__":
    main()
