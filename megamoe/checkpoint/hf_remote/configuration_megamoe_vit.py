"""Configuration of megamoe's ViT / V-MoE image classifier as a transformers model
(model_type "megamoe_vit"), shipped as remote code with `modeling_megamoe_vit.py`.

Fields beyond transformers' usual ones:
- image_size, patch_size, num_channels: square images of `image_size` pixels in
  `patch_size`² patches; `num_tokens` = (image_size / patch_size)² (+ 1 with `pool` "cls");
- pool: "cls" (the class token is read by the classifier) or "gap" (mean of the patch tokens);
- position_embedding: "learned" (a tensor in the weights) or "sincos" (fixed 2-D, computed);
- pre_norm (CLIP's pre_layrnorm: a LayerNorm on the embeddings, `embeddings.pre_layernorm`),
  patch_bias (false: the patch projection has no bias, as CLIP's), hidden_act "gelu" or
  "quick_gelu" (x·σ(1.702x), CLIP's): megamoe's `model.vit` options of the same names; the
  vit family's export keeps the defaults, the vlm family's vision tower
  (modeling_megamoe_vlm.py) sets them;
- moe_layers: 0/1 per layer (MoE FFN or dense); router, num_experts, num_experts_per_tok,
  router_options, capacity_factor…: as megamoe's `MegamoeConfig` (routers_megamoe.py runs them).
"""

from __future__ import annotations

from transformers import PretrainedConfig

POOLS = ("cls", "gap")
POSITION_EMBEDDINGS = ("learned", "sincos")
ACTIVATIONS = ("gelu", "quick_gelu")


class MegamoeViTConfig(PretrainedConfig):
    model_type = "megamoe_vit"

    def __init__(self, image_size=32, patch_size=4, num_channels=3, pool="cls",
                 position_embedding="learned", num_tokens=None, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=None, head_dim=None, hidden_act="gelu",
                 layer_norm_eps=1e-5, initializer_range=0.02, moe_layers=None, num_experts=0,
                 moe_intermediate_size=128, router="topk", num_experts_per_tok=2,
                 score_function="softmax", norm_topk_prob=True,
                 shared_expert_intermediate_size=0, router_options=None,
                 loss_free_bias_rate=0.0, router_z_loss_coef=0.0, capacity_factor=None,
                 token_drop_policy="probs", pad_to_capacity=False, soft_moe_groups=None,
                 pre_norm=False, patch_bias=True, **kwargs):
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.pool, self.position_embedding = pool, position_embedding
        self.pre_norm, self.patch_bias = bool(pre_norm), bool(patch_bias)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act, self.layer_norm_eps = hidden_act, layer_norm_eps
        self.initializer_range = initializer_range
        if moe_layers is None:
            moe_layers = [int(num_experts > 0)] * num_hidden_layers
        self.moe_layers = [int(x) for x in moe_layers]
        self.num_experts, self.moe_intermediate_size = num_experts, moe_intermediate_size
        self.router, self.num_experts_per_tok = router, num_experts_per_tok
        self.score_function, self.norm_topk_prob = score_function, norm_topk_prob
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.router_options = dict(router_options or {})
        self.loss_free_bias_rate = float(loss_free_bias_rate)
        self.router_z_loss_coef = router_z_loss_coef
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.token_drop_policy, self.pad_to_capacity = token_drop_policy, bool(pad_to_capacity)
        self.soft_moe_groups = soft_moe_groups
        side = image_size // patch_size if patch_size else 0
        self.num_tokens = num_tokens or side * side + int(pool == "cls")
        self.vocab_size = 0          # routers_megamoe reads it (PLR heads only)
        self.routing_context = {}    # images carry no synthetic modality ids or timesteps
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        """A folder this code cannot run is refused with the field, not mis-run."""
        if self.pool not in POOLS:
            raise ValueError(f"pool: {self.pool!r}; one of {', '.join(POOLS)}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding: {self.position_embedding!r}; one of "
                             f"{', '.join(POSITION_EMBEDDINGS)}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not tile image_size "
                             f"{self.image_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act: {self.hidden_act!r}; one of {', '.join(ACTIVATIONS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if len(self.moe_layers) != self.num_hidden_layers:
            raise ValueError(f"moe_layers: {len(self.moe_layers)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.router == "soft" and self.soft_moe_groups != "sequence":
            raise ValueError(f"soft_moe_groups: {self.soft_moe_groups!r}; exported before "
                             "Soft MoE's slots became per sequence, which this code computes")
