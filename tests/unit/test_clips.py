"""The video pieces of the vlm family: the clips generator (deterministic, a fixed split, answers
that the pixels bear out, a clip-blind baseline of 1/4), tubelet embeddings against torch's
Conv3d, 3-D sin-cos positions against hand values, pixel shuffle per time slice, and config
errors naming their field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamoe.blocks.tubelets import TubeletEmbedding, sincos_3d, tubeletify
from megamoe.config import ConfigError, load_config
from megamoe.data.clips import (DIRECTION, DIRECTIONS, FIRST, ClipsDataset, blind_baselines,
                                describe_clip, render_clip)
from megamoe.data.shapes import COLOURS, VALID_BASE
from megamoe.models.checks import check_config
from megamoe.models.vlm.model import pixel_shuffle
from megamoe.testing.video import TINY_VIDEO


def _check(*overrides):
    cfg = load_config(None, [*TINY_VIDEO, *overrides])
    check_config(cfg, launch=False)
    return cfg


@pytest.mark.parametrize("overrides,field", [
    (["model.vit.tubelet_size=3"], "model.vit.tubelet_size:"),
    (["data.kind=scenes", "model.seq_length=40"], "model.vit.tubelet_size:"),
    (["data.num_frames=1"], "data.num_frames:"),
    (["data.num_frames=12"], "data.num_frames:"),     # 16 px: at most 10 frames of motion
    (["data.image_size=18"], "model.vit.patch_size:"),
    (["model.seq_length=12"], "model.seq_length:"),
    (["model.vlm.contrastive_coeff=0.5"], "model.vlm.contrastive_coeff:"),
    (["model.vit.position_embedding=sincos", "model.vlm.encoder_hidden_size=32"],
     "model.vit.position_embedding:"),
])
def test_bad_video_config_is_one_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _check(*overrides)
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_good_video_configs_pass():
    from megamoe.config.vlm import encoder_tokens, image_tokens

    cfg = _check()
    assert (encoder_tokens(cfg), image_tokens(cfg)) == (2 * 16, 2 * 4)   # 2 slices of 4x4
    cfg = _check("model.vit.position_embedding=sincos", "model.vlm.encoder_hidden_size=48",
                 "data.num_frames=8", "model.vit.tubelet_size=4", "model.vlm.pixel_shuffle=1",
                 "model.seq_length=42")
    assert (encoder_tokens(cfg), image_tokens(cfg)) == (32, 32)


def _embedding(D=12, position="learned", class_token=False):
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=1)
    torch.manual_seed(0)
    emb = TubeletEmbedding(config, image_size=8, patch_size=4, frames=4, tubelet_size=2,
                           class_token=class_token, position_embedding=position)
    return emb


def test_tubelet_embedding_is_a_conv3d_with_stride_equal_to_kernel():
    """proj.weight as a [D, C, t, P, P] kernel, Conv3d over [B, C, T, H, W] with stride =
    kernel, flattened (slice, row, col): the same tokens. Control: the same clip with its
    frames in reverse order gives other tokens (time is not averaged away)."""
    emb = _embedding()
    with torch.no_grad():
        emb.position_embeddings.normal_()
    clips = torch.randint(0, 256, (2, 4, 3, 8, 8), dtype=torch.uint8)
    got_SBD = emb(clips)
    kernel = emb.proj.weight.reshape(12, 3, 2, 4, 4)
    x = (clips.float() / 127.5 - 1).permute(0, 2, 1, 3, 4)               # [B, C, T, H, W]
    ref_BDN = F.conv3d(x, kernel, emb.proj.bias, stride=(2, 4, 4)).flatten(2)
    ref_SBD = (ref_BDN.transpose(1, 2) + emb.position_embeddings).transpose(0, 1)
    assert got_SBD.shape == (2 * 2 * 2, 2, 12)
    assert torch.allclose(got_SBD, ref_SBD, atol=1e-5)
    reversed_SBD = emb(clips.flip(1))
    assert (reversed_SBD - ref_SBD).abs().max() > 0.1


def test_tubeletify_order_hand_computed():
    """A 1-channel 4-frame 4×4 clip of values 100·f + 4·y + x, tubelet 2 × patch 2: token 5 is
    time slice 1 (frames 2, 3), row 0, column 1, flattened (dt, dy, dx)."""
    f, y, x = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    clip = (100 * f + 4 * y + x).float().reshape(1, 4, 1, 4, 4)
    tokens = tubeletify(clip, 2, 2)
    assert tokens.shape == (1, 8, 8)
    assert tokens[0, 5].tolist() == [202, 203, 206, 207, 302, 303, 306, 307]


def test_sincos_3d_hand_values_and_time_differs():
    """dim 12: a third (4 channels, ω = [1, 1/100]) each for slice, row, column; token of
    (slice 1, row 0, column 2) on a 2×3×3 grid is 1·9 + 0·3 + 2 = 11."""
    pos = sincos_3d(2, 3, 12)
    enc = lambda p: [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]  # noqa
    assert pos.shape == (18, 12)
    assert torch.allclose(pos[11], torch.tensor(enc(1) + enc(0) + enc(2)), atol=1e-6)
    # the same patch in the two time slices: only the time third differs
    diff = (pos[:9] - pos[9:]).abs()
    assert diff[:, :4].amax(dim=1).min() > 0.5 and diff[:, 4:].max() == 0
    emb = _embedding(D=12, position="sincos", class_token=True)
    assert emb.position_embeddings is None and emb.fixed_positions.shape == (1 + 8, 12)
    assert torch.equal(emb.fixed_positions[0], torch.zeros(12))


def test_pixel_shuffle_per_time_slice():
    """Video pixel shuffle = the image shuffle of each time slice, slices kept in order."""
    side, r, slices, B, E = 4, 2, 3, 2, 5
    x = torch.randn(slices * side * side, B, E)
    got = pixel_shuffle(x, side, r, slices)
    per = [pixel_shuffle(x[k * 16:(k + 1) * 16], side, r) for k in range(slices)]
    assert got.shape == (slices * 4, B, 4 * E) and torch.equal(got, torch.cat(per))
    assert not torch.equal(got, torch.cat(per[::-1]))       # control: slices out of order


def test_clips_are_deterministic_and_split():
    a = ClipsDataset(3, 16, "train", 100, num_frames=4)
    b = ClipsDataset(3, 16, "train", 100, num_frames=4)
    v = ClipsDataset(3, 16, "valid", 100, num_frames=4)
    x, y = a.get_batch([5, 6]), b.get_batch([5, 6])
    assert x["images"].shape == (2, 4, 3, 16, 16) and x["images"].dtype == np.uint8
    assert np.array_equal(x["images"], y["images"]) and np.array_equal(x["tokens"], y["tokens"])
    assert not np.array_equal(x["images"][0], x["images"][1])
    assert v.describe(5)["index"] == VALID_BASE + 5
    assert not np.array_equal(v.get_images([5]), a.get_images([5]))
    assert np.array_equal(a.get_images([5, 6]), x["images"])
    other_seed = ClipsDataset(4, 16, "train", 100, num_frames=4).get_batch([5])
    assert not np.array_equal(other_seed["images"][0], x["images"][0])


def _colour_mask(frame_CHW, colour: str):
    """Pixels within 60 of the named colour (jitter ±25, noise σ 6)."""
    want = np.asarray(COLOURS[colour], float)[:, None, None]
    return np.abs(frame_CHW.astype(float) - want).max(axis=0) < 60


def test_answers_are_what_the_pixels_show():
    """direction: the asked shape's colour centroid moves the answer's way (> 3 px over the
    clip); first: frame 0 shows the answer's colour, and the other shape's hardly (a few
    pixels of anti-aliased edges or noise may come close to it). A wrong rule
    (the answer of the neighbouring sample) disagrees with the pixels."""
    checked = {DIRECTION: 0, FIRST: 0}
    wrong = contrasts = 0
    for g in range(40):
        d, n = describe_clip(0, g), describe_clip(0, g + 1)
        clip = render_clip(0, g)
        if d["template"] == DIRECTION:
            cols = [np.argwhere(_colour_mask(clip[f], d["shapes"][0]["colour"])).mean(0)
                    for f in (0, 3)]
            dy, dx = cols[1] - cols[0]
            ex, ey = DIRECTIONS[d["answer"]]
            assert dx * ex + dy * ey > 3, (g, d["answer"], dx, dy)
            if n["template"] == DIRECTION and n["answer"] != d["answer"]:
                nx, ny = DIRECTIONS[n["answer"]]
                wrong += dx * nx + dy * ny > 3
                contrasts += 1
        else:
            shown = _colour_mask(clip[0], d["answer"]).sum()
            other = _colour_mask(clip[0], d["shapes"][1]["colour"]).sum()   # edges, noise
            assert shown >= 4 and other < shown / 3, (g, shown, other)
        checked[d["template"]] += 1
    assert min(checked.values()) >= 10, checked
    assert wrong == 0 and contrasts >= 3, (wrong, contrasts)


def test_whole_pixel_motion_is_the_shape_drawn_there():
    """Frames shift frame 0's coverage by whole pixels: exactly what drawing the shape at the
    moved centre gives. Control: a shift one pixel short differs."""
    from megamoe.data.clips import _shifted
    from megamoe.data.shapes import shape_alpha

    for g in range(6):
        s = describe_clip(0, g)["shapes"][0]
        (dx, dy), k = DIRECTIONS[s["direction"]], s["step"]
        assert k == 3                        # 0.6 · 16 px over 3 frame steps
        a0 = shape_alpha(s["kind"], 16, *s["centers"][0], s["radius"], s["angle"])
        drawn = shape_alpha(s["kind"], 16, *s["centers"][3], s["radius"], s["angle"])
        assert np.array_equal(_shifted(a0, 3 * k * dx, 3 * k * dy), drawn)
        assert not np.array_equal(_shifted(a0, (3 * k - 1) * dx, (3 * k - 1) * dy), drawn)


def test_blind_baseline_is_a_quarter():
    """Answers are uniform given the question text: the majority guess per template and per
    exact question scores about 1/4 (binomial σ ≈ 0.02 on 600 questions)."""
    b = blind_baselines(0, 4, 16, n_train=2000, n_valid=600)
    assert b["num_questions"] == 600
    for key in ("template", "question"):
        assert 0.18 < b[key] < 0.32, b
    assert set(b["per_template"]) == {"direction", "first"}


def built_video_task(overrides=()):
    """(parameters built, the accounting's total, |Δ answer logits| when only the clip's frame
    order changes, clip tokens the model makes)."""
    from megamoe.engines.megatron import build_engine
    from megamoe.models.registry import family_datasets, family_for
    from megamoe.models.vlm.model import vision_context

    cfg = _check("parallel.world_size=1", *overrides)
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"), with_optimizer=False, ddp=False)
    model, task = engine.modules[0].eval(), engine.task
    padding = (model.vocab_size - vocab) * cfg.model.hidden_size * 2   # embedding + output
    built = sum(p.numel() for p in model.parameters()) - padding
    batch = task.collate(train.get_batch([0, 1]), [0, 1])

    def logits(b):
        with torch.no_grad():
            return model(b["tokens"], b["position_ids"], None, images=b["images"],
                         context=task.context(b, 0),
                         vision_context=vision_context(b, 0, task.encoder_tokens))[..., :vocab]

    reversed_clip = dict(batch, images=batch["images"].flip(1))
    effect = (logits(reversed_clip) - logits(batch)).abs().max().item()
    return built, family_for(cfg).parameter_counts(cfg, vocab)[0], effect, \
        int((batch["tokens"][0] == 3).sum())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides,clip_tokens", [
    ([], 8), (["model.vit.position_embedding=sincos", "model.vlm.encoder_hidden_size=48",
               "model.vit.pool=cls", "model.vlm.pixel_shuffle=1", "model.seq_length=44"], 32)],
    ids=["learned", "sincos_cls"])
def test_built_video_model_counts_and_reads_the_frame_order(overrides, clip_tokens):
    """The built model's parameters are the accounting's (the tubelet projection is t times a
    patch's), the placeholders are the clip tokens, and reversing the frames changes the
    answer logits."""
    from megamoe.testing.pool import run_distributed

    built, counted, effect, placeholders = run_distributed(built_video_task, 1, overrides)[0]
    assert built == counted
    assert placeholders == clip_tokens
    assert effect > 1e-4
