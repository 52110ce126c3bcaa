"""`MegamoeVLMConfig`: megamoe's multimodal model (the `vlm` family) as a transformers config
(model_type "megamoe_vlm"), for `modeling_megamoe_vlm.py`. Used for the models transformers'
LLaVA cannot express (pixel shuffle, a vision tower that is not CLIP's, megamoe's routers).

Shipped into the exported folder with the LM's and the ViT's remote code, which it reuses:
- vision_config: a `MegamoeViTConfig` (configuration_megamoe_vit.py) of the vision tower: the
  layers up to the one whose output is read (the tower has no final norm and no classifier);
  its CLIP options (pre_norm, patch_bias, hidden_act "quick_gelu") as megamoe's `model.vit`.
- text_config: a `MegamoeConfig` (configuration_megamoe.py) of the language model.
- image_token_id: the placeholder the image embeddings replace (megamoe's `<image>`);
  image_seq_length: placeholders per image (tower tokens / pixel_shuffle²).
- vision_feature_select_strategy: "default" drops the class token from the tower's output,
  "full" keeps it (LLaVA's names).
- pixel_shuffle (megamoe's `model.vlm.pixel_shuffle`, r): each r×r block of neighbouring patch
  features becomes one token of r²× the width, before the projector.
- projector_hidden_size (`model.vlm.connector_hidden_size`): the projector is
  Linear(r²·E → C) · GELU (erf) · Linear(C → D), both biased, as Megatron's
  MultimodalProjector that megamoe trains.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .configuration_megamoe import MegamoeConfig
from .configuration_megamoe_vit import MegamoeViTConfig

SELECT_STRATEGIES = ("default", "full")


def _sub_config(cls, value):
    """A sub-config from config.json's dict (or an instance, or None: the defaults)."""
    if isinstance(value, cls):
        return value
    fields = dict(value or {})
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        fields.pop(key, None)
    return cls(**fields)


class MegamoeVLMConfig(PretrainedConfig):
    model_type = "megamoe_vlm"

    def __init__(self, vision_config=None, text_config=None, image_token_id=3,
                 image_seq_length=None, vision_feature_select_strategy="default",
                 pixel_shuffle=1, projector_hidden_size=None, projector_hidden_act="gelu",
                 tie_word_embeddings=False, **kwargs):
        self.vision_config = _sub_config(MegamoeViTConfig, vision_config)
        self.text_config = _sub_config(MegamoeConfig, text_config)
        self.image_token_id = image_token_id
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.pixel_shuffle = pixel_shuffle
        self.projector_hidden_size = projector_hidden_size or self.text_config.hidden_size
        self.projector_hidden_act = projector_hidden_act
        self.tie_word_embeddings = bool(tie_word_embeddings or
                                        self.text_config.tie_word_embeddings)
        self._validate()
        self.image_seq_length = image_seq_length or self.image_tokens()
        if self.image_seq_length != self.image_tokens():
            raise ValueError(f"image_seq_length: {self.image_seq_length}; the vision tower and "
                             f"pixel_shuffle give {self.image_tokens()} image tokens")
        super().__init__(**kwargs)

    def with_class_token(self) -> bool:
        v = self.vision_config
        return v.pool == "cls" and self.vision_feature_select_strategy == "full"

    def image_tokens(self) -> int:
        """Image embeddings per image: the patch features / r² (+ the class token)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return (side // self.pixel_shuffle) ** 2 + int(self.with_class_token())

    def _validate(self) -> None:
        """A folder this code cannot run is refused with the field, not mis-run."""
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy: "
                             f"{self.vision_feature_select_strategy!r}; one of "
                             f"{', '.join(SELECT_STRATEGIES)}")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act: {self.projector_hidden_act!r}; the "
                             "projector is GELU (erf)")
        side = self.vision_config.image_size // self.vision_config.patch_size
        r = self.pixel_shuffle
        if not isinstance(r, int) or r < 1 or side % r:
            raise ValueError(f"pixel_shuffle: {r!r}; a whole number dividing the {side} patches "
                             "per image side")
        if r > 1 and self.with_class_token():
            raise ValueError("pixel_shuffle: > 1 needs the patch grid alone "
                             "(vision_feature_select_strategy 'default')")
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(f"image_token_id: {self.image_token_id}; outside the vocabulary "
                             f"({self.text_config.vocab_size})")
