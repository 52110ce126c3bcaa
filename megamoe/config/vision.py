"""Options of the `vit` family (`model.vit`): how images become tokens and how the classifier
reads them. The transformer itself uses `model`'s common keys (layers, width, heads, FFN, MoE).

A ViT as in ViT (Dosovitskiy et al. 2021) and V-MoE (papers.md §4): non-overlapping
`patch_size` × `patch_size` patches, linearly embedded; learned absolute position embeddings
(or fixed 2-D sin-cos); a class token read by the head (`pool: cls`) or the mean of the patch
tokens (`pool: gap`). Tokens per image: (image_size / patch_size)² (+ 1 with the class token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megamoe.config.errors import at_least, fail, one_of

# the shapes generator (megamoe.data.shapes): 6 kinds x 4 colours; smaller images are unreadable
SHAPES_MAX_CLASSES = 24
SHAPES_MIN_IMAGE_SIZE = 16
SCENES_MAX_SHAPES = 4           # the scenes generator: one shape per cell of a 2 x 2 grid
POOLS = ("cls", "gap")
POSITION_EMBEDDINGS = ("learned", "sincos")


@dataclass
class ViTOptions:
    SECTION: ClassVar[str] = "model.vit"

    patch_size: int = 4
    pool: str = "cls"                    # cls: a class token; gap: mean of the patch tokens
    position_embedding: str = "learned"  # learned | sincos (fixed 2-D, not a parameter)
    num_classes: int | None = None       # None: the data's (data.num_classes)

    def validate(self) -> None:
        at_least(self, "patch_size", 1)
        one_of(self, "pool", POOLS)
        one_of(self, "position_embedding", POSITION_EMBEDDINGS)
        at_least(self, "num_classes", 2)


def grid_side(cfg) -> int:
    """Patches per image side; ConfigError naming the field when the patch does not tile the
    image."""
    size, patch = cfg.data.image_size, cfg.model.vit.patch_size
    if size % patch:
        fail("model.vit.patch_size", f"{patch} does not divide data.image_size ({size})")
    return size // patch


def image_tokens(cfg) -> int:
    """Tokens per image: the patches, plus the class token with `pool: cls`."""
    return grid_side(cfg) ** 2 + (cfg.model.vit.pool == "cls")


def num_classes(cfg) -> int:
    """The classifier's outputs: `model.vit.num_classes`, or the data's."""
    explicit = cfg.model.vit.num_classes
    if explicit is None:
        return cfg.data.num_classes
    if explicit < cfg.data.num_classes:
        fail("model.vit.num_classes", f"{explicit} is smaller than data.num_classes "
             f"({cfg.data.num_classes}): labels would not fit")
    return explicit
