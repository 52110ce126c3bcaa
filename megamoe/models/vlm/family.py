"""The `vlm` family: image (video, sound) + text — the vit family's encoder, a connector and
the lm family's MoE (or MoE-MoR) decoder (megamoe.models.vlm.model), trained on the generated
scenes (or the generated clips, megamoe.models.vlm.video; or the generated sounds' log-mel
spectrograms, one channel: megamoe.data.sounds) with next-token loss on answers and captions
(megamoe.models.vlm.task).

Causal: the decoder is; its routers follow the lm family's causality rule. The encoder's MoE
layers (model.vlm.encoder_moe_layer_freq) use model.moe's experts and router, which must then
route image tokens on hidden states alone (the vit family's routers): see `check_vlm`.
"""

from __future__ import annotations

from megamoe.config.errors import fail
from megamoe.models.lm.family import LM, _check_mor as check_lm_mor
from megamoe.models.registry import Family, register


def check_vlm(cfg) -> None:
    """The config describes a model this family can build (one line naming the field)."""
    from megamoe.config.vlm import image_tokens

    m = cfg.model
    if cfg.data.kind == "sounds":
        from megamoe.data.sounds import check_sounds

        check_sounds(cfg, image_tokens(cfg))
    elif cfg.data.kind == "clips":
        from megamoe.models.vlm.video import check_video

        check_video(cfg)
    elif cfg.data.kind == "energon":
        from megamoe.data.energon_shards import check_energon_config

        check_energon_config(cfg)
    elif cfg.data.kind != "scenes":
        fail("data.kind", f"model.family 'vlm' trains on images, video or sounds with text: "
             f"set it to 'scenes', 'clips', 'sounds' or 'energon', got {cfg.data.kind!r}")
    else:
        from megamoe.data.scenes import check_seq_length

        d = cfg.data
        check_seq_length(m.seq_length, image_tokens(cfg), d.max_shapes, d.caption_fraction)
    from megamoe.config.vision import tower_layers
    from megamoe.config.vlm import encoder_config, encoder_tokens

    tower_layers(encoder_config(cfg))     # model.vit.vision_feature_layer within the encoder
    p = cfg.parallel
    tp = p.vision_tensor_size
    if tp > 1 and p.sequence_parallel is not False and encoder_tokens(cfg) % tp:
        fail("model.vit.pool", f"the encoder's {encoder_tokens(cfg)} tokens per image (with the "
             f"class token) do not split over its TP {tp} under sequence parallelism: use "
             f"'gap' (no class token) or parallel.vision_tensor: 1")
    if m.vlm.encoder_moe_layer_freq is not None:
        _check_encoder_moe(cfg)
    if m.modality_norm != "none" and m.num_modalities < 2:
        fail("model.num_modalities", f"{m.num_modalities}: the vlm family's tokens have two "
             f"modalities (0 text, 1 image)")
    if cfg.train.engine != "megatron":
        fail("train.engine", f"{cfg.train.engine!r}: the vlm family trains on the megatron "
             "engine (its DeepSpeed path is not built or tested yet)")
    if m.vlm.contrastive_coeff > 0:
        if cfg.parallel.pipeline > 1:
            fail("model.vlm.contrastive_coeff", "the contrastive loss needs the image "
                 "embeddings (first stage) and the caption states (last stage) on one stage: "
                 "parallel.pipeline must be 1")
        if m.mor.enabled:
            fail("model.vlm.contrastive_coeff", "the text-only pass runs the plain decoder; "
                 "Mixture-of-Recursions LMs do not support it yet")
    if cfg.data.packing:
        from megamoe.models.vlm.packing import check_packing

        check_packing(cfg)
    if m.vit.position_embedding == "sincos" and m.vlm.encoder_hidden_size % 4 and \
            cfg.data.kind != "clips":
        fail("model.vit.position_embedding", f"'sincos' needs model.vlm.encoder_hidden_size "
             f"divisible by 4, got {m.vlm.encoder_hidden_size}")


def _check_encoder_moe(cfg) -> None:
    """MoE FFNs in the encoder: model.moe's experts (with biases, as ViT's: expert-TP 1, no
    shared expert) and a router that routes image tokens on hidden states alone; the
    encoder's context has no text, timesteps or labels (one line naming the field)."""
    from megamoe.models.vit.family import ROUTERS_FOR_VIT

    moe = cfg.model.moe
    if not moe.num_experts:
        fail("model.vlm.encoder_moe_layer_freq", "MoE FFNs in the encoder take model.moe's "
             "experts: set model.moe.num_experts, or leave it null (a dense encoder)")
    if moe.router not in ROUTERS_FOR_VIT:
        fail("model.moe.router", f"'{moe.router}' cannot route the encoder's image tokens "
             f"(model.vlm.encoder_moe_layer_freq: it needs context an encoder lacks, e.g. "
             f"text); choose one of {', '.join(ROUTERS_FOR_VIT)}")
    if moe.shared_expert_ffn_hidden_size:
        fail("model.moe.shared_expert_ffn_hidden_size", "Megatron-Core's shared experts take "
             "no biases and the encoder's linears have them (model.vlm.encoder_moe_layer_freq):"
             " set it 0 (dit_moe: also model.moe.dit_moe.require_shared_expert=false)")
    if cfg.parallel.expert_tensor_size > 1:
        fail("parallel.expert_tensor", f"{cfg.parallel.expert_tensor_size}: the encoder's "
             "experts (model.vlm.encoder_moe_layer_freq) have biases, which Megatron-Core "
             "supports only with expert-TP 1: set it to 1")


def _task(cfg):
    from megamoe.models.vlm.task import VLMTask

    return VLMTask(cfg)


def _build(cfg, tconfig, grid, vocab_size: int, grids=None) -> list:
    from megamoe.models.vlm.model import build_vlm

    return build_vlm(cfg, tconfig, grid, vocab_size, grids=grids)


def _parameter_counts(cfg, vocab_size: int):
    from megamoe.models.vlm.accounting import parameter_counts

    return parameter_counts(cfg, vocab_size)


def _flops_per_token(cfg, vocab_size: int) -> float:
    from megamoe.models.vlm.accounting import flops_per_token

    return flops_per_token(cfg, vocab_size)


def _dataset_kwargs(cfg) -> dict:
    """What the scenes (sounds) data needs from the model: placeholders per image (clip)."""
    from megamoe.config.vlm import image_tokens

    return {"image_tokens": image_tokens(cfg)}


def _describe(cfg, _vocab: int) -> dict:
    from megamoe.config.vlm import image_tokens, patch_side

    v = cfg.model.vlm
    moe = "dense" if v.encoder_moe_layer_freq is None else "MoE"
    if cfg.data.kind == "clips":
        from megamoe.models.vlm.video import describe_video

        return {"clips": describe_video(cfg),
                "encoder": f"{v.encoder_num_layers} layers, width {v.encoder_hidden_size}, {moe}"}
    size = cfg.data.image_size
    what, seen = "images", f"{size}x{size}"
    if cfg.data.kind == "sounds":
        from megamoe.config.audio import describe_sounds

        what, seen = "sounds", f"{describe_sounds(cfg.data)} -> log-mel {size} x {size} frames"
    return {what: f"{seen}, patch {cfg.model.vit.patch_size} -> {patch_side(cfg) ** 2} patches "
                  f"-> {image_tokens(cfg)} {'image' if what == 'images' else 'spectrogram'} "
                  f"tokens (pixel shuffle {v.pixel_shuffle})",
            "encoder": f"{v.encoder_num_layers} layers, width {v.encoder_hidden_size}, {moe}"}


def _grad_sync(chunks, grids):
    from megamoe.models.vlm.model import encoder_grad_sync

    return encoder_grad_sync(chunks, grids)


VLM = register(Family(
    name="vlm",
    transformer_config=LM.transformer_config,     # the decoder is the lm family's
    build=_build,
    task=_task,
    parameter_counts=_parameter_counts,
    flops_per_unit=_flops_per_token,
    checks=(check_vlm, check_lm_mor),
    launch_checks=LM.launch_checks,             # the decoder's router causality
    causal=True,
    unit="token",
    step_metrics=LM.step_metrics,               # MoR's depth statistics
    after_step_hooks=LM.after_step_hooks,       # every MoE layer's router, MoR's bias
    describe=_describe,
    dataset_kwargs=_dataset_kwargs,
    grad_sync=_grad_sync,
    notes="image (or audio) + text: vit encoder, connector, MoE(-MoR) LM (model.vlm, "
          "data.kind scenes | sounds | energon)",
))
