"""Options of the `vit` family (`model.vit`): how images become tokens and how the classifier
reads them. The transformer itself uses `model`'s common keys (layers, width, heads, FFN, MoE).

A ViT as in ViT (Dosovitskiy et al. 2021) and V-MoE (papers.md §4): non-overlapping
`patch_size` × `patch_size` patches, linearly embedded; learned absolute position embeddings
(or fixed 2-D sin-cos); a class token read by the head (`pool: cls`) or the mean of the patch
tokens (`pool: gap`). Tokens per image: (image_size / patch_size)² (+ 1 with the class token).

CLIP's vision tower (Radford et al. 2021; transformers' `CLIPVisionModel`), the encoder LLaVA
reads, differs in four switches, all off by default so existing models stay as they were: a
LayerNorm on the embeddings before the first layer (`pre_norm`, CLIP's `pre_layrnorm`), a
patch projection without bias (`patch_bias: false`), quick_gelu (x·σ(1.702x)) in the MLPs, and
a class token with learned positions (`pool: cls`, `position_embedding: learned`, already the
defaults). What a vision tower hands on (megamoe.models.vit.model.build_vision_tower) is
LLaVA's choice too: the hidden state `vision_feature_layer` (an index into (embeddings,
layer 1, …, layer L), before any final norm; negative from the end) with the class token
dropped (`vision_feature_select_strategy: default`) or kept (`full`).
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
ACTIVATIONS = ("gelu", "quick_gelu")
FEATURE_STRATEGIES = ("default", "full")     # LLaVA's: drop the class token | keep it


@dataclass
class ViTOptions:
    SECTION: ClassVar[str] = "model.vit"

    patch_size: int = 4
    tubelet_size: int = 1                # video (data.kind clips): frames per tubelet token
    pool: str = "cls"                    # cls: a class token; gap: mean of the patch tokens
    position_embedding: str = "learned"  # learned | sincos (fixed 2-D, not a parameter)
    num_classes: int | None = None       # None: the data's (data.num_classes)
    pre_norm: bool = False               # LayerNorm on the embeddings (CLIP's pre_layrnorm)
    patch_bias: bool = True              # false: the patch projection has no bias (CLIP)
    activation: str = "gelu"             # gelu | quick_gelu (CLIP) in the encoder's MLPs
    vision_feature_layer: int = -1       # vision tower output: this hidden state (LLaVA's index)
    vision_feature_select_strategy: str = "default"   # default: without the class token | full

    def validate(self) -> None:
        at_least(self, "patch_size", 1)
        at_least(self, "tubelet_size", 1)
        one_of(self, "pool", POOLS)
        one_of(self, "position_embedding", POSITION_EMBEDDINGS)
        at_least(self, "num_classes", 2)
        one_of(self, "activation", ACTIVATIONS)
        one_of(self, "vision_feature_select_strategy", FEATURE_STRATEGIES)


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


def time_slices(cfg) -> int:
    """Tubelet time slices per sample: data.num_frames / model.vit.tubelet_size for video
    (ConfigError naming the field when the tubelet does not tile the clip), 1 for images."""
    t = cfg.model.vit.tubelet_size
    if cfg.data.kind != "clips":
        if t != 1:
            fail("model.vit.tubelet_size", f"{t}: tubelets are for video (data.kind 'clips'); "
                 f"images ({cfg.data.kind!r}) need 1")
        return 1
    T = cfg.data.num_frames
    if T % t:
        fail("model.vit.tubelet_size", f"{t} does not divide data.num_frames ({T})")
    return T // t


def num_classes(cfg) -> int:
    """The classifier's outputs: `model.vit.num_classes`, or the data's."""
    explicit = cfg.model.vit.num_classes
    if explicit is None:
        return cfg.data.num_classes
    if explicit < cfg.data.num_classes:
        fail("model.vit.num_classes", f"{explicit} is smaller than data.num_classes "
             f"({cfg.data.num_classes}): labels would not fit")
    return explicit


def tower_layers(cfg) -> int:
    """Layers a vision tower runs: LLaVA's `vision_feature_layer` indexes the L + 1 hidden
    states (embeddings, then each layer's output), so -1 is all L layers and 0 none."""
    layer, L = cfg.model.vit.vision_feature_layer, cfg.model.num_layers
    if not -(L + 1) <= layer <= L:
        fail("model.vit.vision_feature_layer", f"{layer} does not index the {L + 1} hidden "
             f"states of model.num_layers={L} (embeddings, then each layer)")
    if layer % (L + 1) == 0:
        fail("model.vit.vision_feature_layer", f"{layer} selects the embeddings; a vision "
             f"tower runs at least one layer")
    return layer % (L + 1)


def feature_tokens(cfg) -> int:
    """Tokens per image a vision tower hands on: the patches, plus the class token when it
    has one and `vision_feature_select_strategy` is `full`."""
    v = cfg.model.vit
    return grid_side(cfg) ** 2 + (v.pool == "cls" and v.vision_feature_select_strategy == "full")
