"""The shapes image set: procedural RGB images of one coloured shape on a textured background,
for the vision families (V-MoE classification now; captions, questions and diffusion later).

Classes. A class is (shape kind, colour): 6 kinds × 4 colours = 24 at most, 12 by default.
Class c has kind `KINDS[c % 6]` and colour `COLOURS[c // 6]`, so the first n classes use every
kind before a colour repeats: the default 12 are the six kinds in red and in blue.

Image. Each image is a pure function of (seed, global index g): its draws come from
`numpy.random.default_rng([seed, g])` (no global RNG state), so any image can be made without the
others, in any process. Per image: the class (uniform), the shape's circumradius
r ∈ [0.28, 0.45]·size, its centre (uniform such that the shape stays inside), a rotation
(uniform), a per-channel colour jitter of ±25; the background is a grey level with a tint, a
linear gradient and a smooth 4×4 texture; pixel noise (σ = 6) covers the whole image. Shapes are
drawn with Pillow at 4× and box-filtered down (anti-aliased edges). Same numpy and Pillow
versions → same bytes.

Splits. Train image i is global index i; validation image i is global index VALID_BASE + i. The
ranges are disjoint for any sizes, and an image does not change when a split grows.

Samples. `dataset[i]` → (image uint8 [3, H, W], label int); `dataset.get_batch(indices)` →
(images uint8 [B, 3, H, W], labels int64 [B]), what megamoe.data.loader hands the family's
collate. Models scale to float themselves (x / 255).

    python -m megamoe.data.shapes --grid out.png     # a contact sheet: a row per class

Legend: B batch, C = 3 channels, H, W image height and width (H = W = size), S supersampled side.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from PIL import Image, ImageDraw

from megamoe.config.errors import ConfigError
from megamoe.config.vision import SHAPES_MAX_CLASSES, SHAPES_MIN_IMAGE_SIZE

KINDS = ("circle", "square", "triangle", "cross", "ring", "star")
COLOURS = {                      # name → RGB; saturated hues, far from the grey background
    "red": (220, 40, 40),
    "blue": (40, 80, 230),
    "green": (40, 175, 60),
    "yellow": (235, 205, 30),
}
COLOUR_NAMES = tuple(COLOURS)
MAX_CLASSES = len(KINDS) * len(COLOURS)
assert MAX_CLASSES == SHAPES_MAX_CLASSES    # the config's check (data.num_classes) uses that one
DEFAULT_CLASSES = 12
MIN_IMAGE_SIZE = SHAPES_MIN_IMAGE_SIZE
VALID_BASE = 1 << 40             # global index of validation image 0
_SUPERSAMPLE = 4
_RADIUS = (0.28, 0.45)           # circumradius r / size
_JITTER = 25                     # ± per colour channel
_SPLITS = ("train", "valid")


def class_kind_colour(label: int) -> tuple[str, str]:
    """(shape kind, colour name) of class `label`."""
    return KINDS[label % len(KINDS)], COLOUR_NAMES[label // len(KINDS)]


def check_num_classes(num_classes: int) -> None:
    """One error naming `data.num_classes` when the generator cannot make that many classes."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"data.num_classes: must be an integer >= 2, got {num_classes!r}")
    if num_classes > MAX_CLASSES:
        raise ConfigError(f"data.num_classes: {num_classes} > {MAX_CLASSES} the shapes "
                          f"generator can make ({len(KINDS)} kinds x {len(COLOURS)} colours)")


def check_patch_grid(image_size: int, patch_size: int | None = None) -> None:
    """One error naming the field when the image is too small for a shape to be recognisable or
    the patch size does not tile it (`model.vit.patch_size`)."""
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"data.image_size: must be an integer >= {MIN_IMAGE_SIZE}, "
                          f"got {image_size!r}")
    if patch_size is None:
        return
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"model.vit.patch_size: must be an integer >= 1, got {patch_size!r}")
    if image_size % patch_size:
        raise ConfigError(f"model.vit.patch_size: {patch_size} does not divide data.image_size "
                          f"{image_size}")


def _polygon(kind: str, r: float) -> np.ndarray:
    """Vertices [V, 2] of a polygonal kind around the origin, circumradius ≤ r, unrotated."""
    if kind in ("square", "triangle"):
        n = 4 if kind == "square" else 3
        a = 2 * np.pi * np.arange(n) / n + np.pi / 2
        return r * np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "star":           # 5 points, inner radius 0.42 r
        a = np.pi * np.arange(10) / 5 + np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        return rad[:, None] * np.stack([np.cos(a), np.sin(a)], 1)
    assert kind == "cross", kind
    w = 0.3 * r / math.hypot(1.0, 0.3)                 # arm half-width; corners at radius r
    h = r / math.hypot(1.0, 0.3)
    return np.array([(w, h), (w, w), (h, w), (h, -w), (w, -w), (w, -h),
                     (-w, -h), (-w, -w), (-h, -w), (-h, w), (-w, w), (-w, h)])


def shape_alpha(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Coverage [H, W] float32 in [0, 1] of the shape, drawn at 4× and box-filtered down."""
    k = _SUPERSAMPLE
    S = size * k
    img = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(img)
    x, y, R = cx * k, cy * k, r * k
    if kind in ("circle", "ring"):
        draw.ellipse([x - R, y - R, x + R, y + R], fill=255)
        if kind == "ring":
            q = 0.55 * R
            draw.ellipse([x - q, y - q, x + q, y + q], fill=0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        v = _polygon(kind, R) @ np.array([[c, s], [-s, c]])
        draw.polygon([(x + px, y + py) for px, py in v.tolist()], fill=255)
    small = img.reduce(k)                              # box filter: anti-aliased coverage
    return np.asarray(small, dtype=np.float32) / 255.0


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights (centres aligned), for smooth textures."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def textured_background(rng: np.random.Generator, size: int, interp: np.ndarray) -> np.ndarray:
    """[3, H, W] float: a grey level with a tint, a linear gradient and a smooth texture."""
    level = rng.uniform(80.0, 190.0)
    tint = rng.uniform(-12.0, 12.0, size=3)
    theta = rng.uniform(0.0, 2 * np.pi)
    ramp = np.linspace(-1.0, 1.0, size)
    gradient_HW = rng.uniform(0.0, 25.0) * (np.cos(theta) * ramp[None, :]
                                            + np.sin(theta) * ramp[:, None])
    texture_HW = interp @ rng.normal(0.0, 14.0, size=(4, 4)) @ interp.T
    return level + tint[:, None, None] + (gradient_HW + texture_HW)[None]


def describe_image(seed: int, index: int, num_classes: int = DEFAULT_CLASSES,
                   image_size: int = 32) -> dict:
    """What global image `index` shows: label, kind, colour, size (circumradius, pixels), centre
    (x, y, pixels) and rotation (radians). Draws the same numbers the image does, in order."""
    return _draw_params(np.random.default_rng([seed, index]), num_classes, image_size)


def _draw_params(rng: np.random.Generator, num_classes: int, size: int) -> dict:
    label = int(rng.integers(num_classes))
    kind, colour = class_kind_colour(label)
    r = float(rng.uniform(*_RADIUS) * size)
    cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
    angle = float(rng.uniform(0.0, 2 * np.pi))
    return {"label": label, "kind": kind, "colour": colour, "radius": r, "center": (cx, cy),
            "angle": angle}


def render_image(seed: int, index: int, num_classes: int = DEFAULT_CLASSES,
                 image_size: int = 32, *, _interp=None) -> tuple[np.ndarray, int]:
    """(image uint8 [3, H, W], label) of global image `index`; a pure function of its args."""
    rng = np.random.default_rng([seed, index])
    p = _draw_params(rng, num_classes, image_size)
    interp = interp_matrix(image_size, 4) if _interp is None else _interp
    colour_C = np.asarray(COLOURS[p["colour"]], float) + rng.uniform(-_JITTER, _JITTER, size=3)
    bg_CHW = textured_background(rng, image_size, interp)
    alpha_HW = shape_alpha(p["kind"], image_size, *p["center"], p["radius"], p["angle"])
    img_CHW = bg_CHW * (1 - alpha_HW) + colour_C[:, None, None] * alpha_HW
    img_CHW += rng.normal(0.0, 6.0, size=img_CHW.shape)          # pixel noise, shape included
    return np.clip(np.rint(img_CHW), 0, 255).astype(np.uint8), p["label"]


class GeneratedSplit:
    """A split of a generated set (the split rule): split sample i is global index i in
    'train' and VALID_BASE + i in 'valid'. Subclasses set `kind`, `split`, `num_samples` and
    `_base`."""

    kind = "generated"

    def __len__(self) -> int:
        return self.num_samples

    def global_index(self, i: int) -> int:
        """The global sample index of split sample `i`."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"{self.kind} {self.split} index {i} outside [0, "
                             f"{self.num_samples})")
        return self._base + int(i)


class ShapesDataset(GeneratedSplit):
    """One split of the shapes images: `num_samples` images, random access (module docstring)."""

    kind = "shapes"

    def __init__(self, seed: int = 0, image_size: int = 32, num_classes: int = DEFAULT_CLASSES,
                 num_samples: int = 50_000, split: str = "train"):
        check_patch_grid(image_size)
        check_num_classes(num_classes)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if not 1 <= num_samples <= VALID_BASE:
            raise ValueError(f"num_samples must be in [1, 2**40], got {num_samples}")
        self.seed, self.image_size, self.num_classes = seed, image_size, num_classes
        self.num_samples, self.split = num_samples, split
        self._base = 0 if split == "train" else VALID_BASE
        self._interp = interp_matrix(image_size, 4)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return render_image(self.seed, self.global_index(i), self.num_classes, self.image_size,
                            _interp=self._interp)

    def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [B, 3, H, W], labels int64 [B]) of split images `indices`."""
        items = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        images_BCHW = np.stack([x for x, _ in items]) if items else np.zeros(
            (0, 3, self.image_size, self.image_size), np.uint8)
        return images_BCHW, np.array([y for _, y in items], dtype=np.int64)

    def describe(self, i: int) -> dict:
        """Label, kind, colour, radius, centre and angle of split image `i` (plus its global
        index), for captions, questions and noise derived from the index."""
        g = self.global_index(i)
        return {**describe_image(self.seed, g, self.num_classes, self.image_size),
                "index": g}


def build_shapes_datasets(seed: int, image_size: int = 32, num_classes: int = DEFAULT_CLASSES,
                          num_train: int = 50_000, num_valid: int = 2_048):
    """(train, valid, num_classes): the two splits of one shapes image set."""
    common = dict(seed=seed, image_size=image_size, num_classes=num_classes)
    return (ShapesDataset(**common, num_samples=num_train, split="train"),
            ShapesDataset(**common, num_samples=num_valid, split="valid"), num_classes)


def contact_sheet(dataset: ShapesDataset, per_class: int = 8, scale: int = 3) -> Image.Image:
    """A grid image: row c holds the first `per_class` images of class c (nearest upscaled)."""
    rows: dict[int, list[np.ndarray]] = {c: [] for c in range(dataset.num_classes)}
    i = 0
    while any(len(v) < per_class for v in rows.values()) and i < len(dataset):
        image, label = dataset[i]
        if len(rows[label]) < per_class:
            rows[label].append(image)
        i += 1
    side = dataset.image_size * scale
    pad = 2
    sheet = Image.new("RGB", (per_class * (side + pad) + pad,
                              dataset.num_classes * (side + pad) + pad), (255, 255, 255))
    for c, images in rows.items():
        for j, image_CHW in enumerate(images):
            tile = Image.fromarray(np.ascontiguousarray(image_CHW.transpose(1, 2, 0)))
            tile = tile.resize((side, side), Image.NEAREST)
            sheet.paste(tile, (pad + j * (side + pad), pad + c * (side + pad)))
    return sheet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m megamoe.data.shapes",
                                 description="Write a contact sheet of shapes images per class.")
    ap.add_argument("--grid", required=True, help="output PNG path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=DEFAULT_CLASSES)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--scale", type=int, default=3)
    args = ap.parse_args(argv)
    data = ShapesDataset(args.seed, args.image_size, args.num_classes,
                         num_samples=200 * args.num_classes * args.per_class, split="train")
    contact_sheet(data, args.per_class, args.scale).save(args.grid, format="PNG")
    print(f"wrote {args.grid}: {args.num_classes} classes (rows: "
          + ", ".join("/".join(class_kind_colour(c)[::-1]) for c in range(args.num_classes))
          + ")")


if __name__ == "__main__":
    main()
