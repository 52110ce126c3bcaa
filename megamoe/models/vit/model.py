"""The ViT / V-MoE image classifier on Megatron-Core: patch embedding → megamoe's
bidirectional encoder block (megamoe.specs.vit; dense or MoE FFNs) → final LayerNorm → pooling
(class token or mean) → a linear head → per-image cross-entropy.

Layout. The embedding sits on the first pipeline stage, pooling and head on the last; the
activation between stages is [S, B, D] like the decoder's. Under sequence parallelism the
embedding's output is split along the sequence (its backward gathers, so the replicated
embedding gets the whole gradient on every TP rank) and the last stage gathers the sequence
before pooling with a backward that only splits: the head is replicated, every TP rank computes
the same loss, and summing their gradients would count it TP times.

A vision tower (`build_vision_tower`, for models that read image features, as LLaVA reads
CLIP's) is the same encoder without head or final LayerNorm, cut after the layer whose output
is read (`model.vit.vision_feature_layer`): layers nothing reads are not built, so no
parameter goes without a gradient. `ViTModel.features` returns what LLaVA takes from
`CLIPVisionModel`: that layer's hidden states, TP-replicated, with or without the class token.

Shapes: B images, S tokens per image, S' tokens handed on, D width, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.activations import quick_gelu
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megamoe.blocks.context import Context, bind
from megamoe.blocks.embeddings import PatchEmbedding
from megamoe.blocks.recompute import ContextTransformerBlock
from megamoe.config.vision import grid_side, num_classes, tower_layers
from megamoe.models.lm.model import mark_expert_replicas, moe_layers
from megamoe.models.transformer_config import recompute_options, shared_settings
from megamoe.moe.layer import mark_stream
from megamoe.moe.routers import router_builder
from megamoe.specs.gpt_moe import moe_layer_pattern
from megamoe.specs.vit import encoder_block_spec


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


def transformer_config(cfg, dims, *, sequence_parallel: bool, dtype: torch.dtype,
                       tower: bool = False) -> TransformerConfig:
    """ViT's block: LayerNorm, GELU (or CLIP's quick_gelu) MLP, biases on every linear,
    multi-head attention (grouped-query with `model.num_query_groups`). `tower`: the block of
    a vision tower, its first `tower_layers(cfg)` layers."""
    m = cfg.model
    settings = shared_settings(cfg, dims, sequence_parallel=sequence_parallel, dtype=dtype)
    if tower:
        k = tower_layers(cfg)
        pattern = moe_layer_pattern(m.num_layers, m.moe.layer_freq,
                                    settings["num_moe_experts"] or 0)[:k]
        settings["num_layers"] = k
        if not isinstance(settings["moe_layer_freq"], int):
            settings["moe_layer_freq"] = [int(x) for x in pattern]
    return TransformerConfig(
        **settings,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.kv_channels,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[m.vit.activation],
        **recompute_options(cfg.model),
    )


def vit_context(batch: dict, step: int | None = None) -> Context:
    """The classifier's context of a micro-batch: the loader's global sample indices (V-MoE's
    noise) and the labels, built on every pipeline stage."""
    return Context(sample_index_B=batch.get("sample_index"), class_labels_B=batch.get("labels"),
                   step=step)


class ViTModel(MegatronModule):
    """One pipeline chunk of the classifier (module docstring). `forward(images, labels,
    context=...)` returns (per-image losses [B], logits [B, K]) on the last stage when labels
    are given, the logits without them, and the hidden states [S, B, D] on the other stages.

    With `features` set ('default' or 'full', LLaVA's select strategy) it is a whole vision
    tower instead: no head, no final LayerNorm, and `forward` is `features`."""

    def __init__(self, config: TransformerConfig, spec, *, image_size: int, patch_size: int,
                 pool: str, position_embedding: str, num_classes: int | None, pre_process: bool,
                 post_process: bool, pg_collection, vp_stage: int | None = None,
                 patch_bias: bool = True, pre_norm: bool = False, features: str | None = None,
                 channels: int = 3):
        super().__init__(config)
        assert features is None or (pre_process and post_process), "a tower is one chunk"
        self.pre_process, self.post_process, self.pool = pre_process, post_process, pool
        self.num_classes, self.tp_group = num_classes, pg_collection.tp
        self.feature_strategy = features
        self.model_type = ModelType.encoder_or_decoder
        # Megatron's finalize_model_grads asks every first/last stage for a tied embedding
        self.share_embeddings_and_output_weights = False
        if pre_process:
            self.embedding = PatchEmbedding(config, image_size=image_size, patch_size=patch_size,
                                            class_token=pool == "cls",
                                            position_embedding=position_embedding,
                                            bias=patch_bias, pre_norm=pre_norm,
                                            channels=channels)
        self.decoder = ContextTransformerBlock(config=config, spec=spec, pre_process=pre_process,
                                               post_process=post_process,
                                               pg_collection=pg_collection, vp_stage=vp_stage,
                                               post_layer_norm=features is None)
        if post_process and features is None:
            self.head = torch.nn.Linear(config.hidden_size, num_classes,
                                        dtype=config.params_dtype)

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's pipeline schedules hand a stage its input here."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "one input tensor per chunk"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, images_BCHW, labels_B=None, *, context: Context | None = None):
        if self.feature_strategy is not None:
            assert labels_B is None, "a vision tower has no head"
            return self.features(images_BCHW, context=context)
        with bind(context):
            hidden = None
            if self.pre_process:
                hidden = self.embedding(images_BCHW)
                if self.config.sequence_parallel:
                    hidden = scatter_to_sequence_parallel_region(hidden, group=self.tp_group)
            hidden = self.decoder(hidden_states=hidden, attention_mask=None)
            if not self.post_process:
                return hidden
            logits_BK = self.classify(hidden)
            if labels_B is None:
                return logits_BK
            return F.cross_entropy(logits_BK.float(), labels_B, reduction="none"), logits_BK

    def features(self, images_BCHW: torch.Tensor, *, context: Context | None = None
                 ) -> torch.Tensor:
        """[S', B, D]: what LLaVA reads from CLIP's vision tower — the hidden states after
        the tower's last layer (`model.vit.vision_feature_layer`), before any final norm,
        without the class token under the 'default' strategy. TP-replicated: under sequence
        parallelism the sequence is gathered, with a backward that only splits (whatever
        reads the features runs alike on every TP rank and hands each the whole gradient)."""
        assert self.feature_strategy is not None, "features come from build_vision_tower"
        with bind(context):
            hidden_SBD = self.embedding(images_BCHW)
            if self.config.sequence_parallel:
                hidden_SBD = scatter_to_sequence_parallel_region(hidden_SBD, group=self.tp_group)
            hidden_SBD = self.decoder(hidden_states=hidden_SBD, attention_mask=None)
            if self.config.sequence_parallel:
                hidden_SBD = gather_from_sequence_parallel_region(
                    hidden_SBD, tensor_parallel_output_grad=False, group=self.tp_group)
        if self.feature_strategy == "default" and self.embedding.class_token is not None:
            hidden_SBD = hidden_SBD[1:]
        return hidden_SBD

    def classify(self, hidden_SBD: torch.Tensor) -> torch.Tensor:
        """Pool the final-normed tokens and apply the head: [S(/TP), B, D] → [B, K]."""
        if self.config.sequence_parallel:
            hidden_SBD = gather_from_sequence_parallel_region(
                hidden_SBD, tensor_parallel_output_grad=False, group=self.tp_group)
        pooled_BD = hidden_SBD[0] if self.pool == "cls" else hidden_SBD.mean(dim=0)
        return self.head(pooled_BD)


def build_vit(cfg, tconfig: TransformerConfig, pg_collection, _output_size=None) -> list:
    """This rank's chunks (one per virtual pipeline stage) of the classifier `cfg` describes."""
    m, moe, v = cfg.model, cfg.model.moe, cfg.model.vit
    grid_side(cfg)     # the patch tiles the image (ConfigError naming the field otherwise)
    pattern = moe_layer_pattern(m.num_layers, moe.layer_freq, tconfig.num_moe_experts or 0)
    vp = tconfig.virtual_pipeline_model_parallel_size
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    chunks = []
    for vp_stage in (range(vp) if vp else [None]):
        spec = encoder_block_spec(tconfig, pattern, router=router_builder(moe),
                                  shared_expert=bool(moe.shared_expert_ffn_hidden_size),
                                  pg_collection=pg_collection, experts=moe.experts,
                                  fp8=moe.fp8, vp_stage=vp_stage, pp_rank=pp_rank)
        chunks.append(ViTModel(
            tconfig, spec, image_size=cfg.data.image_size, patch_size=v.patch_size,
            pool=v.pool, position_embedding=v.position_embedding, num_classes=num_classes(cfg),
            pre_process=pp_rank == 0 and vp_stage in (None, 0),
            post_process=pp_rank == pp_size - 1 and vp_stage in (None, (vp or 1) - 1),
            pg_collection=pg_collection, vp_stage=vp_stage, patch_bias=v.patch_bias,
            pre_norm=v.pre_norm))
    drop_router_biases(chunks)
    mark_expert_replicas(chunks, tconfig)
    return chunks


def build_vision_tower(cfg, tconfig: TransformerConfig, pg_collection, *,
                       modality_norm: dict | None = None, channels: int = 3) -> ViTModel:
    """The vision tower `cfg` describes (module docstring), whole on this pipeline stage;
    `tconfig` from `transformer_config(cfg, ..., tower=True)`. `tower.features(images)` (or
    `tower(images)`) gives [S', B, D] (megamoe.config.vision.feature_tokens). `modality_norm`:
    CogVideoX's expert AdaLN for both norms of each layer (the vlm family's option).
    `channels`: of the images (1 for the vlm family's log-mel spectrograms)."""
    m, moe, v = cfg.model, cfg.model.moe, cfg.model.vit
    grid_side(cfg)
    k = tower_layers(cfg)
    assert tconfig.num_layers == k, "build the tower's config with transformer_config(tower=True)"
    assert tconfig.pipeline_model_parallel_size == 1, "a vision tower sits on one stage"
    pattern = moe_layer_pattern(m.num_layers, moe.layer_freq, tconfig.num_moe_experts or 0)[:k]
    spec = encoder_block_spec(tconfig, pattern, router=router_builder(moe),
                              shared_expert=bool(moe.shared_expert_ffn_hidden_size),
                              pg_collection=pg_collection, experts=moe.experts, fp8=moe.fp8,
                              pp_rank=0, modality_norm=modality_norm)
    tower = ViTModel(tconfig, spec, image_size=cfg.data.image_size, patch_size=v.patch_size,
                     pool=v.pool, position_embedding=v.position_embedding, num_classes=None,
                     pre_process=True, post_process=True, pg_collection=pg_collection,
                     patch_bias=v.patch_bias, pre_norm=v.pre_norm,
                     features=v.vision_feature_select_strategy, channels=channels)
    drop_router_biases([tower])
    mark_expert_replicas([tower], tconfig)
    # a tower is an encoder inside a larger model: its MoE layers are named apart from that
    # model's (their layer numbers repeat the language model's)
    mark_stream(moe_layers([tower]), "encoder")
    return tower


def drop_router_biases(chunks) -> None:
    """Megatron's router gets a bias whenever the linears have one (`add_bias_linear`, which
    ViT's attention and MLPs need); V-MoE's gate is x·W without a bias (papers.md §4,
    google-research/vmoe's router Dense), as is every other family's."""
    for layer in moe_layers(chunks):
        if getattr(layer.router, "bias", None) is not None:
            layer.router.bias = None
