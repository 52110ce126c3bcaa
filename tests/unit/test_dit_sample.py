"""Sampling from a DiT (issue 15 items 4 and 6; megamoe.models.dit.sample):

- batch independence, per recipe (every configs/*.yaml of model.family dit) and per router
  fragment of the dit family (DiffMoE's threshold rule, EC-DiT, Race, Diff-MoE on the DiT-MoE
  recipe): image 3 sampled alone (position 3, same seed) equals image 3 of a request of 8,
  classifier-free guidance's two halves in the same batch, max |Δ| ≤ 1e-5 on the sample;
  DDPM's per-step noise too. Controls, which must differ: DiffMoE's pool top-k inference rule and expert choice over
  the micro-batch (batch-coupled routers);
- one Euler step (steps = 1) equals the step computed by hand from `predict` with the EMA
  weights and the guidance formula; the trained weights (not the EMA) sample differently; the
  per-step callback sees (0, t = T, the initial noise).
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

from megamoe.testing.pool import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_RANK = ["parallel.world_size=1", "parallel.tensor=1", "parallel.pipeline=1",
            "parallel.expert=1", "train.precision=fp32", "run.tensorboard=false"]
LABELS = [0, 1, 2, 3, 4, 5, 6, 7]
STEPS, SCALE, SEED = 3, 4.0, 17


def fragment(name: str) -> list[str]:
    """configs/moe/<name>.yaml as `--set` overrides."""
    with open(os.path.join(ROOT, "configs", "moe", f"{name}.yaml")) as f:
        tree = yaml.safe_load(f)

    def flat(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(f"{prefix}{key}.", value)
            else:
                yield f"{prefix}{key}={value}"

    return list(flat("", tree))


def _cases() -> dict:
    """name → (recipe path, overrides, batch-independent). The modulations are warm-started
    with std 0.3 (the controls' coupling then shows), except for DDPM: its x̂0 = (x − √(1 − ᾱ)·ε̂)
    / √ᾱ amplifies fp32 rounding of ε̂ (batched kernels, ~3e-7 relative) by up to 1/√ᾱ, and
    std 0.3 makes |ε̂| ≈ 10 (measured: Δ 2.2e-5); std 0.05 gives |ε̂| ≈ 1.5, a trained ε's size."""
    from megamoe.config import load_config

    recipes = [r for r in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
               if load_config(r, ONE_RANK).model.family == "dit"]
    cases = {os.path.basename(r)[:-5]: (r, [], True) for r in recipes}
    moe = os.path.join(ROOT, "configs", "dit_dit_moe.yaml")
    cases.update({
        "dense_ddpm": (os.path.join(ROOT, "configs", "dit_dense.yaml"),
                       ["model.dit.objective=ddpm"], True, 0.05),
        "diffmoe": (moe, fragment("diffmoe"), True),
        "ec_dit": (moe, fragment("ec_dit"), True),
        "race": (moe, ["model.moe.router=race", "model.moe.aux_loss_coeff=0"], True),
        "diff_moe": (moe, ["model.moe.router=diff_moe"], True),
        # controls: routers whose inference couples the images of a batch
        "diffmoe_pool_topk": (moe, [*fragment("diffmoe"),
                                    "model.moe.diffmoe.inference=pool_topk"], False),
        "expert_choice_micro_batch": (moe, [*fragment("ec_dit"),
                                            "model.moe.expert_choice.selection_group="
                                            "micro-batch"], False),
    })
    return cases


CASES = _cases()


def _engine(recipe: str, overrides: list[str], std: float = 0.3):
    from megamoe.config import load_config
    from megamoe.engines.megatron import build_engine
    from megamoe.models.lm.model import moe_layers
    from megamoe.testing.dit import warm_start

    cfg = load_config(recipe, [*ONE_RANK, *overrides])
    engine = build_engine(cfg, cfg.data.num_classes, torch.device("cpu"), with_optimizer=False,
                          ddp=False)
    warm_start(engine, std=std)     # adaLN-Zero's zeros would hide the blocks (and routers)
    for layer in moe_layers(engine.modules):
        if hasattr(layer.router, "expert_threshold"):
            layer.router.expert_threshold.fill_(0.5)   # DiffMoE: sparse, σ(p) ≈ 0.5 at init
    return cfg, engine


def alone_vs_batch_task(cases: dict) -> dict:
    """name → (max |Δ| of image 3 alone vs in the request of 8, max |sample − its start|)."""
    from megamoe.models.dit.model import CHANNELS
    from megamoe.models.dit.sample import initial_noise, sample_images

    out = {}
    for name, (recipe, overrides, _, *std) in cases.items():
        cfg, engine = _engine(recipe, overrides, *std)
        labels = [y % cfg.data.num_classes for y in LABELS]
        kw = dict(steps=STEPS, cfg_scale=SCALE, seed=SEED)
        batch = sample_images(engine.modules, cfg, labels, **kw)
        alone = sample_images(engine.modules, cfg, labels[3:4], positions_B=[3], **kw)
        side = cfg.data.image_size
        start = ((initial_noise(SEED, [3], (CHANNELS, side, side)) + 1) / 2).clamp(0, 1)
        out[name] = ((batch[3:4] - alone).abs().max().item(),
                     (alone - start).abs().max().item())
    return out


@pytest.mark.timeout(300)
def test_one_image_alone_equals_it_inside_a_request_of_8():
    got = run_distributed(alone_vs_batch_task, 1, CASES)[0]
    assert {"dit_dense", "dit_dit_moe"} <= set(got), sorted(got)
    for name, (_, _, independent, *_) in CASES.items():
        delta, moved = got[name]
        assert moved > 0.05, (name, moved)     # the model, not only the noise, made the sample
        if independent:
            assert delta <= 1e-5, (name, delta)
        else:
            assert delta > 1e-4, (name, delta)


def one_step_task() -> dict:
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.dit.model import CHANNELS, predict
    from megamoe.models.dit.sample import initial_noise, sample_images

    cfg, engine = _engine(os.path.join(ROOT, "configs", "dit_dit_moe.yaml"), [], std=0.05)
    with torch.no_grad():                     # trained weights ≠ EMA weights
        g = torch.Generator().manual_seed(3)
        for p in engine.modules[0].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    labels, scale, seed = [2, 5], 2.5, 9
    side, n = cfg.data.image_size, cfg.data.num_classes
    seen = []
    got = sample_images(engine.modules, cfg, labels, steps=1, cfg_scale=scale, seed=seed,
                        on_step=lambda i, t, x: seen.append((i, t, x.clone())))
    trained = sample_images(engine.modules, cfg, labels, steps=1, cfg_scale=scale, seed=seed,
                            ema=False)
    eps = initial_noise(seed, [0, 1], (CHANNELS, side, side))
    t = torch.full((4,), float(cfg.model.dit.num_train_timesteps))      # σ = 1
    with ema_weights(engine.modules):    # one batch: the conditional half, then the null class
        cond, uncond = predict(engine.modules, torch.cat([eps, eps]), t,
                               torch.tensor([*labels, n, n])).chunk(2)
    v = uncond + scale * (cond - uncond)
    x0 = eps + (0.0 - 1.0) * v                                          # σ: 1 → 0
    want = ((x0 + 1) / 2).clamp(0, 1)
    (i, t_seen, x_seen), = seen
    return {"hand": (got - want).abs().max().item(), "on_step": (i, t_seen),
            "on_step_x": (x_seen - eps).abs().max().item(),
            "ema_vs_trained": (got - trained).abs().max().item(),
            "scale": (want - ((eps + 1) / 2).clamp(0, 1)).abs().max().item()}


@pytest.mark.timeout(300)
def test_one_euler_step_equals_the_step_by_hand():
    got = run_distributed(one_step_task, 1)[0]
    assert got["scale"] > 0.1, got           # the step moved the noise
    assert got["hand"] <= 1e-6, got
    assert got["on_step"] == (0, 1000.0) and got["on_step_x"] == 0.0, got   # the callback
    assert got["ema_vs_trained"] > 1e-3, got  # sampling used the EMA weights
