"""The pieces of `megamoe eval` on a dit run (megamoe.commands.eval_dit, dit_judge): the t-bin
loss equals a direct per-image computation from the documented draws (another seed: another
figure, the control); KID and FID of a set against itself are ≈ 0 and against a brightened copy
are not (the control); a judge of another image set is refused with one line naming the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megamoe.config import load_config
from megamoe.testing.dit import TINY_DIT
from megamoe.testing.pool import run_distributed

JUDGE = ["parallel.world_size=1", "parallel.expert=1", "model.num_layers=2",
         "model.hidden_size=32", "model.num_attention_heads=2", "model.moe.layer_freq=[0,0]",
         "model.vit.patch_size=4", "data.image_size=16", "data.num_classes=6",
         "train.precision=fp32", "run.tensorboard=false"]


def _direct_loss(chunks, cfg, images, labels, index, seed):
    """Per bin, one image at a time: ε and the level from default_rng([seed, 0xE7A1, i]),
    x_t = (1 − σ)x + σε, loss = mean (v̂ − (ε − x))² with the EMA weights."""
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.dit.model import predict

    out = np.zeros(8)
    with ema_weights(chunks):
        for img, y, i in zip(images, labels, index):
            rng = np.random.default_rng([seed, 0xE7A1, i])
            eps = torch.from_numpy(rng.standard_normal((3, 16, 16), dtype=np.float32))
            levels = (np.arange(8) + rng.random(8)) / 8
            x = img.float() / 127.5 - 1
            for k, s in enumerate(levels):
                s = float(s)
                pred = predict(chunks, ((1 - s) * x + s * eps)[None],
                               torch.tensor([s * 1000.0]), y[None])
                out[k] += ((pred[0] - (eps - x)) ** 2).mean().item() / len(index)
    return out


def loss_task():
    from megamoe.commands.eval_dit import loss_by_t
    from megamoe.engines.megatron import build_engine
    from megamoe.testing.dit import warm_start

    cfg = load_config(None, [*TINY_DIT, "parallel.world_size=1"])
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    warm_start(engine, std=0.2)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels, index = torch.tensor([0, 4, 5]), [7, 11, 2]
    got = loss_by_t(engine.modules, cfg, images, labels, index, seed=5, batch=2)
    other = loss_by_t(engine.modules, cfg, images, labels, index, seed=6, batch=2)
    return got, _direct_loss(engine.modules, cfg, images, labels, index, 5).tolist(), other


def test_t_bin_loss_equals_a_direct_computation():
    got, want, other_seed = run_distributed(loss_task, 1)[0]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    assert max(want) - min(want) > 1e-3, want            # the bins see different t
    assert not np.allclose(got, other_seed, rtol=1e-3), (got, other_seed)   # the control


def judge_task(run_dir: str):
    """An untrained judge saved as a step-0 run: (KID/FID pieces, the refusal of `load_judge`
    at the default bound, what it returns at an explicit bound of 0)."""
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.commands.dit_judge import load_judge
    from megamoe.engines.megatron import build_engine

    cfg = load_config("configs/vit_judge.yaml", JUDGE)
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    cfg.run.dir = run_dir
    save_checkpoint(f"{run_dir}/checkpoints", engine, {"vocab_size": 6}, config=cfg)
    dit = load_config(None, TINY_DIT)
    try:
        load_judge(run_dir, dit, log=lambda _: None)
        refusal = None
    except ValueError as exc:
        refusal = str(exc)
    _, accuracy, images = load_judge(run_dir, dit, 0.0, log=lambda _: None)
    return kid_fid_pieces(engine, cfg), refusal, accuracy, images


def kid_fid_pieces(engine, cfg):
    from megamoe.commands.dit_judge import JudgeFeatures, kid_fid
    from megamoe.models.registry import family_datasets

    extractor = JudgeFeatures(engine.modules[0])
    _, valid, _ = family_datasets(cfg)
    real = torch.as_tensor(np.asarray(valid.get_batch(np.arange(64))[0]))
    brighter = (real.int() + 60).clamp(max=255).to(torch.uint8)
    feats, logits = extractor.features_and_logits(real[:5])
    return (kid_fid(extractor, real, real, seed=1), kid_fid(extractor, real, brighter, seed=1),
            tuple(feats.shape), tuple(logits.shape), extractor.num_features)


def test_judge_refusal_then_kid_fid_of_a_set_with_itself_and_with_a_shifted_set(tmp_path):
    pieces, refusal, accuracy, images = run_distributed(judge_task, 1, str(tmp_path))[0]
    assert refusal == (f"--judge {tmp_path}: its validation accuracy is {accuracy:.4f} (step 0, "
                       f"{images} images), below 0.9: its verdicts would mean nothing (train "
                       "configs/vit_judge.yaml to the end, or lower --min-judge-accuracy)")
    assert accuracy < 0.9 and images == 8 * 64          # train.eval_iters × global batch
    same, shifted, feats_shape, logits_shape, dims = pieces
    assert feats_shape == (5, 32) and logits_shape == (5, 6) and dims == 32 <= 128
    # KID's subsets of one set still differ: its estimate is 0 within its spread
    assert abs(same["fid"]) < 1e-6 and abs(same["kid"]) < 2 * same["kid_std"], same
    # measured: FID 2.17, KID 0.58 ± 0.10 (itself: FID ~1e-11, KID -0.010 ± 0.015)
    assert shifted["fid"] > 0.5 and shifted["kid"] > 5 * shifted["kid_std"], shifted
    assert shifted["kid"] > 10 * abs(same["kid"]), (same, shifted)
    assert same["kid_subset_size"] == 32 and same["feature_dims"] == 32


@pytest.mark.parametrize("override,field", [("data.num_classes=12", "data.num_classes"),
                                            ("data.shapes_seed=3", "data.shapes_seed"),
                                            ("data.image_size=32", "data.image_size")])
def test_a_judge_of_another_image_set_is_refused_naming_the_field(override, field):
    from megamoe.commands.dit_judge import check_judge_config

    dit = load_config(None, TINY_DIT)
    check_judge_config(load_config("configs/vit_judge.yaml", JUDGE), dit, "runs/j")
    with pytest.raises(ValueError) as err:
        check_judge_config(load_config("configs/vit_judge.yaml", [*JUDGE, override]), dit,
                           "runs/j")
    assert str(err.value).startswith(f"--judge runs/j: {field} is") and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model.family is 'dit'"):
        check_judge_config(dit, dit, "runs/j")
