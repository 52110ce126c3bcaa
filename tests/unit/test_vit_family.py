"""The vit family's pieces: bad configs refused with one line naming the field, the patch order
and 2-D sin-cos positions against hand-computed values, and the built encoder attending in both
directions (a causal encoder would leave the class token blind to every patch)."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.blocks.embeddings import patchify, sincos_2d
from megamoe.config import ConfigError, load_config
from megamoe.models.checks import check_config
from megamoe.testing.parity import TINY_VIT
from megamoe.testing.pool import run_distributed


def _check(*overrides):
    cfg = load_config(None, [*TINY_VIT, "run.progress=false", *overrides])
    check_config(cfg, launch=False)
    return cfg


@pytest.mark.parametrize("overrides,field", [
    (["data.image_size=18"], "model.vit.patch_size:"),
    (["data.num_classes=30"], "data.num_classes:"),
    (["data.image_size=8"], "data.image_size:"),
    (["model.vit.pool=first"], "model.vit.pool:"),
    (["model.moe.router=modality"], "model.moe.router:"),
    (["data.kind=markov"], "data.kind:"),
    (["model.vit.num_classes=3"], "model.vit.num_classes:"),
    (["model.vit.position_embedding=sincos", "model.hidden_size=30",
      "model.num_attention_heads=3"], "model.vit.position_embedding:"),
    # 16 patches + the class token: not divisible by TP 2 under sequence parallelism
    (["parallel.world_size=2", "parallel.tensor=2"], "model.vit.pool:"),
    (["model.family=lm"], "data.kind:"),
])
def test_bad_vit_config_is_one_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _check(*overrides)
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_good_configs_pass():
    assert _check().model.family == "vit"
    _check("model.vit.pool=gap", "parallel.world_size=2", "parallel.tensor=2")


def test_patchify_order_is_row_major_channel_major():
    """A 1×2×4×4 image with patch 2: patch 1 is the top-right block, flattened (c, dy, dx)."""
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 8)
    # channel 0 rows 0-1, columns 2-3 → 2, 3, 6, 7; channel 1 adds 16
    assert p[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert p[0, 2].tolist() == [8, 9, 12, 13, 24, 25, 28, 29]


def test_sincos_2d_hand_values():
    """dim 8: ω = [1, 1/100]; position (row 1, col 2) = patch 1·side + 2 = 5 of a 3×3 grid:
    [sin 1, sin .01, cos 1, cos .01, sin 2, sin .02, cos 2, cos .02]."""
    pos = sincos_2d(3, 8)
    want = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
            math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert pos.shape == (9, 8)
    assert torch.allclose(pos[5], torch.tensor(want), atol=1e-6)
    assert torch.allclose(pos[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))


def bidirectional_task(pool: str):
    """|Δ logits| when only the last patch of image 0 changes, for image 0 and image 1 (the
    other image of the batch); V-MoE dropless, so routing couples no images."""
    from megamoe.engines.megatron import build_engine

    cfg = _check(f"model.vit.pool={pool}", "model.moe.vmoe.capacity_ratio=null",
                 "model.moe.vmoe.priority=none", "parallel.world_size=1")
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    model = engine.modules[0].eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    changed = images.clone()
    changed[0, :, 12:, 12:] = 255 - changed[0, :, 12:, 12:]     # the last 4×4 patch
    with torch.no_grad():
        a, b = model(images), model(changed)
    return [(a - b)[i].abs().max().item() for i in range(2)]


@pytest.mark.timeout(300)
def test_class_token_sees_the_last_patch():
    """Bidirectional attention: the class token (position 0) reads the last patch. Control: the
    other image of the batch is untouched."""
    same_image, other_image = run_distributed(bidirectional_task, 1, "cls")[0]
    assert same_image > 1e-4
    assert other_image == 0.0
