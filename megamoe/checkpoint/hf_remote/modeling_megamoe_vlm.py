"""megamoe's multimodal model (the `vlm` family) as a transformers model: what megamoe's
eval-mode VLMModel computes, for the folders `megamoe convert` writes when transformers' LLaVA
cannot express the model. Shipped next to configuration_megamoe_vlm.py and the LM's and the
ViT's remote code, which it reuses (imports only torch, transformers and those files). Load with
    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)

The forward is LLaVA's:
- vision tower (modeling_megamoe_vit.py's embeddings and layers, CLIP's options included): the
  hidden states after its last layer, no final norm; the class token dropped under
  `vision_feature_select_strategy` "default". Pixels: uint8 → x/127.5 − 1, float taken as
  already in [−1, 1].
- pixel shuffle r: [B, N, E] row-major patch features → [B, N/r², r²·E], each r×r block of
  neighbouring patches concatenated (row within the block, then column, then channel) into
  one token, blocks in row-major order (megamoe.models.vlm.model.pixel_shuffle).
- projector: linear_2(GELU(linear_1(x))), both biased (Megatron's MultimodalProjector, erf GELU).
- the image embeddings replace the `image_token_id` placeholders of the text embeddings, in
  order (as masked_scatter); the language model (modeling_megamoe.py's MegamoeModel) then runs
  on the merged sequence. Its routers see modality ids 1 at the placeholders and 0 on text
  (megamoe's VLMo modality experts / Uni-MoE pools), unless `modality_ids` is passed.

Legend: B batch, S text positions, N patch features per image, n image tokens, E tower width,
D LM width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:                                    # transformers 5: initialisers that skip loaded tensors
    from transformers import initialization as init
except ImportError:                     # pragma: no cover - transformers 4
    from torch.nn import init

from .configuration_megamoe_vlm import MegamoeVLMConfig
from .modeling_megamoe import CACHE_NAME, MegamoeModel, kv_cache_argument
from .modeling_megamoe_vit import (
    MegamoeViTEmbeddings, MegamoeViTEncoder, MegamoeViTPreTrainedModel,
)

IMAGE, TEXT = 1, 0          # modality ids the language model's routers see


class MegamoeVisionTower(MegamoeViTPreTrainedModel):
    """The ViT's embeddings and layers without final norm or classifier: [B, 3, H, W] →
    [B, S, E] hidden states after the last layer."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = MegamoeViTEmbeddings(config)
        self.encoder = MegamoeViTEncoder(config)
        self.post_init()

    def forward(self, pixel_values):
        return self.encoder(self.embeddings(pixel_values))


def pixel_shuffle(features_BNE: torch.Tensor, r: int) -> torch.Tensor:
    """[B, N, E] row-major patches → [B, N / r², r²·E] (module docstring)."""
    if r == 1:
        return features_BNE
    B, N, E = features_BNE.shape
    side = int(round(N ** 0.5))
    x = features_BNE.reshape(B, side // r, r, side // r, r, E)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (side // r) ** 2, r * r * E)


class MegamoeVLMProjector(nn.Module):
    def __init__(self, config: MegamoeVLMConfig):
        super().__init__()
        width = config.pixel_shuffle ** 2 * config.vision_config.hidden_size
        self.linear_1 = nn.Linear(width, config.projector_hidden_size)
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class MegamoeVLMPreTrainedModel(PreTrainedModel):
    config_class = MegamoeVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MegamoeDecoderLayer", "MegamoeViTLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The projector and the LM head; the tower and the LM initialise their own."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.text_config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class MegamoeVLMModel(MegamoeVLMPreTrainedModel):
    def __init__(self, config: MegamoeVLMConfig):
        super().__init__(config)
        self.vision_tower = MegamoeVisionTower(config.vision_config)
        self.multi_modal_projector = MegamoeVLMProjector(config)
        self.language_model = MegamoeModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values) -> torch.Tensor:
        """[B, n, D]: each image's embeddings as the language model receives them."""
        hidden_BSE = self.vision_tower(pixel_values)
        if (self.config.vision_config.pool == "cls"
                and self.config.vision_feature_select_strategy == "default"):
            hidden_BSE = hidden_BSE[:, 1:]
        return self.multi_modal_projector(pixel_shuffle(hidden_BSE, self.config.pixel_shuffle))

    def merge_images(self, input_ids_BS, embeds_BSD, pixel_values) -> torch.Tensor:
        """The text embeddings with the image embeddings written over the placeholders."""
        if input_ids_BS is None:
            raise ValueError("pixel_values: needs input_ids (the image placeholders' positions)")
        image_BnD = self.get_image_features(pixel_values).to(embeds_BSD.dtype)
        placeholders_BS = input_ids_BS == self.config.image_token_id
        found, want = int(placeholders_BS.sum()), image_BnD.shape[0] * image_BnD.shape[1]
        if found != want:
            raise ValueError(f"input_ids: {found} image placeholder tokens (id "
                             f"{self.config.image_token_id}), the {image_BnD.shape[0]} images "
                             f"give {want} image embeddings ({image_BnD.shape[1]} each)")
        return embeds_BSD.masked_scatter(placeholders_BS.unsqueeze(-1), image_BnD)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, modality_ids=None,
                cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            inputs_embeds = self.merge_images(input_ids, inputs_embeds, pixel_values)
        if modality_ids is None and input_ids is not None:
            modality_ids = torch.where(input_ids == self.config.image_token_id, IMAGE, TEXT)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache,
                                   cache=kv_cache_argument(cache, past_key_values),
                                   modality_ids=modality_ids)


class MegamoeVLMForConditionalGeneration(MegamoeVLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MegamoeVLMConfig):
        super().__init__(config)
        self.model = MegamoeVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size,
                                 bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, modality_ids=None, cache=None, **kwargs):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values,
                         attention_mask=attention_mask, position_ids=position_ids,
                         cache=kv_cache_argument(cache, past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         modality_ids=modality_ids)
        h_BSD = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h_BSD = h_BSD[:, -logits_to_keep:]
        logits_BSV = self.lm_head(h_BSD)
        loss = None
        if labels is not None:       # next-token loss; -100 is ignored
            loss = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits_BSV.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BSV,
                                      **{CACHE_NAME: getattr(out, CACHE_NAME)})

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """A Mixture-of-Recursions LM has no KV cache: every step feeds the whole sequence,
        images included (as MegamoeForCausalLM does without them)."""
        if self.config.text_config.mor:
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs.update(next_sequence_length=None, position_ids=None, use_cache=False)
        return super().prepare_inputs_for_generation(input_ids, **kwargs)
