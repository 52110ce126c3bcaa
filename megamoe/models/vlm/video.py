"""The vlm family on video (`data.kind: clips`, megamoe.data.clips): its config checks and
description. The model is the image one with a tubelet embedding in the vision tower
(megamoe.blocks.tubelets) and T/t time slices of image tokens per clip (megamoe.config.vlm)."""

from __future__ import annotations

from megamoe.config.errors import fail


def check_video(cfg) -> None:
    """The config describes a video model this family can build (one line naming the field)."""
    from megamoe.config.vision import time_slices
    from megamoe.config.vlm import image_tokens
    from megamoe.data.clips import check_motion, check_seq_length

    m = cfg.model
    check_motion(cfg.data.num_frames, cfg.data.image_size)
    time_slices(cfg)            # model.vit.tubelet_size divides data.num_frames
    check_seq_length(m.seq_length, image_tokens(cfg))
    if m.vlm.contrastive_coeff > 0:
        fail("model.vlm.contrastive_coeff", "the clips data has no captions to contrast the "
             "clips with: set it to 0")
    if m.vit.position_embedding == "sincos" and m.vlm.encoder_hidden_size % 6:
        fail("model.vit.position_embedding", f"'sincos' for video splits the channels over "
             f"time, rows and columns: model.vlm.encoder_hidden_size must be divisible by 6, "
             f"got {m.vlm.encoder_hidden_size}")


def describe_video(cfg) -> str:
    """The clips line of `megamoe train`'s model description."""
    from megamoe.config.vision import time_slices
    from megamoe.config.vlm import encoder_tokens, image_tokens

    d, v = cfg.data, cfg.model.vit
    return (f"{d.num_frames} frames of {d.image_size}x{d.image_size}, tubelet "
            f"{v.tubelet_size}x{v.patch_size}x{v.patch_size} -> {time_slices(cfg)} time slices, "
            f"{encoder_tokens(cfg)} encoder tokens -> {image_tokens(cfg)} clip tokens (pixel "
            f"shuffle {cfg.model.vlm.pixel_shuffle})")
