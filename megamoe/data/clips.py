"""The clips video+text set: short procedural clips of moving coloured shapes, each with a
closed-answer question that needs time, for the multimodal (`vlm`) family's video encoder.

Clip. T frames (`num_frames`) of side H on one textured background (megamoe.data.shapes's
drawing: background, colour jitter, anti-aliasing; fresh pixel noise per frame). A shape has
circumradius r ∈ [0.16, 0.2] · H and moves straight in its own direction (left, right, up or
down, uniform) by the most whole pixels per frame that keep any shape's path inside the frame
(3 at 16 × 16 over 4 frames; `max_step`), its start uniform where the path fits. A `direction`
clip holds the shape asked about, alone and visible throughout. A `first` clip holds two shapes
of distinct kinds and colours: F visible over frames [0, T − u), S over [v, T), u and v
independent and uniform in {1 … T − 1}, so S appears after F (and F vanishes before the end).

Questions (template uniform; answers uniform given the question text, so the best clip-blind
accuracy is 1/4 for each — `blind_baselines` measures it):
    0 direction  "which way does the {colour} {kind} move?"  → left | right | up | down
    1 first      "which colour appears first?"               → F's colour
Why a single frame does not answer them: a frame shows where a shape is, not where it goes —
direction needs two frames (start positions are uniform where the path fits, so a frame's
position leaks only a weak prior, strongest at the clip's ends); and the `first` clips are
time-symmetric — reversed, a clip is another clip of the same distribution with F and S
swapped (u and v are identically distributed) — so a frame showing one shape is as likely to
come from a clip where that shape came first as from one where it came last, and a frame
showing both says nothing about their order.

Determinism and splits as in megamoe.data.scenes: sample g is a pure function of (seed, g)
through `numpy.random.default_rng([seed, g, stream])` (clip, text, pixels); train sample i is
global index i, validation sample i is global index VALID_BASE + i.

Sequence as in the scenes set: tokens = [<bos>, <image> × image_tokens, prompt, answer, <eos>,
<pad> …], loss_mask 1 at the answer and <eos>; the image tokens are the clip's (tubelet tokens,
megamoe.config.vlm.image_tokens). There are no captions: `caption_tokens` is [<bos>, <eos>].

    batch = ClipsDataset(seed, 16, "train", 1000, num_frames=4, image_tokens=8).get_batch(idx)
    batch["images"] uint8 [B, T, 3, H, W]; batch["tokens"] int64 [B, S + 1];
    batch["loss_mask"] float32 [B, S]; batch["template"] int64 [B]; batch["index"] int64 [B]

Legend: B batch, T frames, S seq_length, C = 3 channels, H, W frame side.
"""

from __future__ import annotations

import numpy as np

from megamoe.config.errors import fail
from megamoe.data.scenes import blind_accuracy
from megamoe.data.shapes import (COLOUR_NAMES, COLOURS, KINDS, VALID_BASE, GeneratedSplit,
                                 check_patch_grid, interp_matrix, shape_alpha,
                                 textured_background)
from megamoe.data.word_tokenizer import WordTokenizer

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # (dx, dy)
TEMPLATES = ("direction", "first")
DIRECTION, FIRST = 0, 1
WORDS = ("which", "way", "does", "the", "move", "colour", "appears", "first", *DIRECTIONS,
         *KINDS, *COLOUR_NAMES, "?")
_RADIUS = (0.16, 0.2)            # circumradius r / frame side
_JITTER = 25                     # ± per colour channel
_NOISE = 6.0                     # pixel noise σ
_CLIP, _TEXT, _PIXELS = 1, 2, 3  # generator streams of one sample
_SPLITS = ("train", "valid")


def clips_tokenizer() -> WordTokenizer:
    """The closed vocabulary of the clips set."""
    return WordTokenizer(WORDS)


def max_step(num_frames: int, image_size: int) -> int:
    """Pixels a shape moves per frame: the most that keeps the path of any shape (radius up to
    0.2 · H) inside the frame; 0 when even one pixel per frame does not fit."""
    return int((1 - 2 * _RADIUS[1]) * image_size) // (num_frames - 1)


def _shapes(rng: np.random.Generator, template: int, T: int, size: int) -> list[dict]:
    """The two shapes of a clip: kind, colour, direction, radius, centre per frame (pixels)
    and visible frames [first, last); shape 0 is F (appears first in `first` clips)."""
    kinds = rng.choice(len(KINDS), size=2, replace=False)
    colours = rng.choice(len(COLOURS), size=2, replace=False)
    step = max_step(T, size)            # whole pixels per frame
    travel = step * (T - 1)
    if template == FIRST:
        u, v = (int(x) for x in rng.integers(1, T, size=2))
        spans = [(0, T - u), (v, T)]
    else:       # the shape asked about, alone
        spans = [(0, T)]
    shapes = []
    for kind, colour, span in zip(kinds.tolist(), colours.tolist(), spans):
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        dx, dy = DIRECTIONS[direction]
        r = float(rng.uniform(*_RADIUS) * size)
        # start uniform such that the whole path stays inside the frame
        x0, y0 = (float(rng.uniform(r + travel * max(-d, 0), size - r - travel * max(d, 0)))
                  for d in (dx, dy))
        shapes.append({"kind": KINDS[kind], "colour": COLOUR_NAMES[colour],
                       "direction": direction, "radius": r, "span": span, "step": step,
                       "centers": [(x0 + dx * step * f, y0 + dy * step * f) for f in range(T)],
                       "angle": float(rng.uniform(0.0, 2 * np.pi))})
    return shapes


def describe_clip(seed: int, index: int, num_frames: int = 4, image_size: int = 16) -> dict:
    """What global sample `index` shows and asks, without drawing it: its shapes, template id,
    prompt and answer."""
    template = int(np.random.default_rng([seed, index, _TEXT]).integers(len(TEMPLATES)))
    shapes = _shapes(np.random.default_rng([seed, index, _CLIP]), template, num_frames,
                     image_size)
    if template == DIRECTION:
        s = shapes[0]
        prompt, answer = f"which way does the {s['colour']} {s['kind']} move?", s["direction"]
    else:
        prompt, answer = "which colour appears first?", shapes[0]["colour"]
    return {"index": index, "shapes": shapes, "template": template, "prompt": prompt,
            "answer": answer}


def _shifted(alpha_HW: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`alpha_HW` moved by (dx, dy) whole pixels, zeros shifted in."""
    out_HW = np.zeros_like(alpha_HW)
    H, W = alpha_HW.shape
    out_HW[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        alpha_HW[max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out_HW


def render_clip(seed: int, index: int, num_frames: int = 4, image_size: int = 16, *,
                _interp=None, _shapes=None) -> np.ndarray:
    """Clip uint8 [T, 3, H, W] of global sample `index`; a pure function of its arguments."""
    shapes = describe_clip(seed, index, num_frames, image_size)["shapes"] if _shapes is None \
        else _shapes
    rng = np.random.default_rng([seed, index, _PIXELS])
    interp = interp_matrix(image_size, 4) if _interp is None else _interp
    background_CHW = textured_background(rng, image_size, interp)
    colours = [np.asarray(COLOURS[s["colour"]], float) + rng.uniform(-_JITTER, _JITTER, 3)
               for s in shapes]
    # each shape drawn once, at frame 0; it moves by whole pixels, so a frame's coverage is
    # frame 0's shifted (the same pixels as drawing it there: Pillow's rasterising does not
    # change under whole-pixel shifts)
    alphas = [shape_alpha(s["kind"], image_size, *s["centers"][0], s["radius"], s["angle"])
              for s in shapes]
    frames = []
    for f in range(num_frames):
        img_CHW = background_CHW.copy()
        for s, colour_C, alpha0_HW in zip(shapes, colours, alphas):
            if s["span"][0] <= f < s["span"][1]:
                dx, dy = DIRECTIONS[s["direction"]]
                alpha_HW = _shifted(alpha0_HW, dx * s["step"] * f, dy * s["step"] * f)
                img_CHW = img_CHW * (1 - alpha_HW) + colour_C[:, None, None] * alpha_HW
        img_CHW = img_CHW + rng.normal(0.0, _NOISE, size=img_CHW.shape)
        frames.append(np.clip(np.rint(img_CHW), 0, 255).astype(np.uint8))
    return np.stack(frames)


def max_sample_length(image_tokens: int) -> int:
    """The longest sample (tokens incl. <bos>, image tokens and <eos>)."""
    tok = clips_tokenizer()
    longest = max(len(tok.encode(f"which way does the {c} {k} move?"))
                  for c in COLOUR_NAMES for k in KINDS)
    return 1 + image_tokens + longest + 1 + 1      # one-word answers


def check_motion(num_frames: int, image_size: int) -> None:
    """ConfigError naming `data.num_frames` when a shape cannot move a pixel per frame."""
    if max_step(num_frames, image_size) < 1:
        fail("data.num_frames", f"{num_frames} frames of {image_size} pixels: a shape cannot "
             f"move one pixel per frame and stay inside (at most "
             f"{int(0.6 * image_size) + 1} frames; or raise data.image_size)")


def check_seq_length(seq_length: int, image_tokens: int) -> None:
    """ConfigError naming `model.seq_length` when the longest clips sample does not fit."""
    need = max_sample_length(image_tokens) - 1
    if seq_length < need:
        fail("model.seq_length", f"{seq_length} is too short for the clips data: its longest "
             f"sample is {need + 1} tokens, so it must be >= {need} ({image_tokens} clip tokens)")


class ClipsDataset(GeneratedSplit):
    """One split of the clips set: `num_samples` samples, random access (module docstring)."""

    kind = "clips"

    def __init__(self, seed: int = 0, image_size: int = 16, split: str = "train",
                 num_samples: int = 1_000_000, num_frames: int = 4, image_tokens: int = 8,
                 seq_length: int | None = None):
        check_patch_grid(image_size)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if not 1 <= num_samples <= VALID_BASE:
            raise ValueError(f"num_samples must be in [1, 2**40], got {num_samples}")
        if not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(f"num_frames must be an integer >= 2, got {num_frames!r}")
        check_motion(num_frames, image_size)
        self.seed, self.image_size, self.split = seed, image_size, split
        self.num_samples, self.num_frames, self.image_tokens = num_samples, num_frames, \
            image_tokens
        self.tokenizer = clips_tokenizer()
        self.seq_length = (max_sample_length(image_tokens) - 1 if seq_length is None
                           else seq_length)
        self._base = 0 if split == "train" else VALID_BASE
        self._interp = interp_matrix(image_size, 4)

    def describe(self, i: int) -> dict:
        return describe_clip(self.seed, self.global_index(i), self.num_frames, self.image_size)

    def sequence(self, d: dict) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 [S + 1], loss_mask float32 [S]) of a described sample."""
        return self.tokenizer.question_sequence(
            d["prompt"], d["answer"], self.image_tokens, self.seq_length,
            f"clips {self.split} sample {d['index'] - self._base}")

    def __getitem__(self, i: int) -> dict:
        d = self.describe(i)
        tokens_S1, loss_mask_S = self.sequence(d)
        clip_TCHW = render_clip(self.seed, d["index"], self.num_frames, self.image_size,
                                _interp=self._interp, _shapes=d["shapes"])
        return {"image": clip_TCHW, "tokens": tokens_S1, "loss_mask": loss_mask_S,
                "template": d["template"], "index": d["index"], "prompt_text": d["prompt"],
                "answer_text": d["answer"]}

    def get_images(self, indices) -> np.ndarray:
        """uint8 [B, T, 3, H, W]: the clips alone of split samples `indices` (no text)."""
        clips = [render_clip(self.seed, self.global_index(int(i)), self.num_frames,
                             self.image_size, _interp=self._interp)
                 for i in np.asarray(indices).reshape(-1)]
        H, T = self.image_size, self.num_frames
        return np.stack(clips) if clips else np.zeros((0, T, 3, H, H), np.uint8)

    def get_batch(self, indices) -> dict:
        """The batch of split samples `indices`: arrays stacked on a leading B."""
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        tok, B = self.tokenizer, len(items)
        H, T = self.image_size, self.num_frames
        caption_BL = np.tile(np.array([tok.bos_id, tok.eos_id], np.int64), (B, 1))
        return {
            "images": np.stack([x["image"] for x in items]) if items
            else np.zeros((0, T, 3, H, H), np.uint8),
            "tokens": np.stack([x["tokens"] for x in items]) if items
            else np.zeros((0, self.seq_length + 1), np.int64),
            "loss_mask": np.stack([x["loss_mask"] for x in items]) if items
            else np.zeros((0, self.seq_length), np.float32),
            "template": np.array([x["template"] for x in items], np.int64),
            "index": np.array([x["index"] for x in items], np.int64),
            "prompt_text": [x["prompt_text"] for x in items],
            "answer_text": [x["answer_text"] for x in items],
            "caption_tokens": caption_BL, "caption_end": np.ones(B, np.int64),
        }


def build_clips_datasets(data_cfg, image_tokens: int, seq_length: int,
                         num_train: int = 1_000_000, num_valid: int = 4096):
    """(train, valid, vocab_size): the two splits of the clips set for `data_cfg` (the
    DataConfig fields shapes_seed, image_size, num_frames)."""
    common = dict(seed=data_cfg.shapes_seed, image_size=data_cfg.image_size,
                  num_frames=data_cfg.num_frames, image_tokens=image_tokens,
                  seq_length=seq_length)
    train = ClipsDataset(split="train", num_samples=num_train, **common)
    valid = ClipsDataset(split="valid", num_samples=num_valid, **common)
    return train, valid, train.tokenizer.vocab_size


def blind_baselines(seed: int = 0, num_frames: int = 4, image_size: int = 16,
                    n_train: int = 20_000, n_valid: int = 2_000) -> dict:
    """The best clip-blind scores on the first `n_valid` validation questions, learned from the
    first `n_train` training samples (text only: nothing is drawn): `template` — the majority
    answer per template; `question` — per exact question text; `per_template` — the template
    guess per template (megamoe.data.scenes.blind_accuracy)."""
    def items(base: int, n: int) -> list[tuple]:
        out = []
        for g in range(base, base + n):
            d = describe_clip(seed, g, num_frames, image_size)
            out.append((d["template"], d["prompt"], d["answer"]))
        return out

    train, valid = items(0, n_train), items(VALID_BASE, n_valid)
    per_template = {TEMPLATES[t]: blind_accuracy(train, [x for x in valid if x[0] == t], 0)
                    for t in range(len(TEMPLATES)) if any(x[0] == t for x in valid)}
    return {"template": blind_accuracy(train, valid, 0),
            "question": blind_accuracy(train, valid, 1),
            "per_template": per_template, "num_questions": len(valid)}
