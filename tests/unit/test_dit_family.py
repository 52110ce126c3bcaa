"""The dit family's pieces: bad configs refused with one line naming the field; the objective's
draws as functions of (seed, step, sample index) and its formulas (rectified flow by hand,
DDPM against diffusers' `add_noise`); the built model — zero output at initialisation
(adaLN-Zero), parameter count = accounting, per-sample predictions independent of the batch
(dense and DiT-MoE; a batch-coupled router as the control), grouped and FP8 experts — and the
EMA (update rule, swapping in and out, sharded like the weights)."""

from __future__ import annotations

import math

import pytest
import torch

from megamoe.blocks.embeddings import patchify, timestep_sinusoid, unpatchify
from megamoe.config import ConfigError, load_config
from megamoe.models.checks import check_config
from megamoe.testing.dit import DENSE, TINY_DIT
from megamoe.testing.pool import run_distributed


def _check(*overrides):
    cfg = load_config(None, [*TINY_DIT, *overrides])
    check_config(cfg, launch=False)
    return cfg


@pytest.mark.parametrize("overrides,field", [
    (["data.image_size=18"], "model.dit.patch_size:"),
    (["data.kind=markov"], "data.kind:"),
    (["model.moe.router=modality"], "model.moe.router:"),
    (["model.dit.objective=edm"], "model.dit.objective:"),
    (["model.dit.class_dropout=1.0"], "model.dit.class_dropout:"),
    (["model.dit.beta_end=0.00001"], "model.dit.beta_end:"),
    (["model.recompute_granularity=full"], "model.recompute_granularity:"),
    (["parallel.world_size=2", "parallel.tensor=2"], "parallel.expert_tensor:"),
    (["model.hidden_size=30", "model.num_attention_heads=3"], "model.hidden_size:"),
])
def test_bad_dit_config_is_one_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        _check(*overrides)
    assert str(err.value).startswith(field), str(err.value)
    assert "\n" not in str(err.value)


def test_good_configs_pass():
    assert _check().model.family == "dit"
    _check("parallel.world_size=2", "parallel.tensor=2", "parallel.expert_tensor=1")
    _check(*DENSE, "model.dit.objective=ddpm")


def test_unpatchify_inverts_patchify_and_sinusoid_hand_values():
    x = torch.arange(2 * 3 * 8 * 8.0).reshape(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)
    # dim 4: ω = [1, 1/100]; t = 2 → [cos 2, cos .02, sin 2, sin .02]
    want = [math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)]
    assert torch.allclose(timestep_sinusoid(torch.tensor([2.0]), 4)[0], torch.tensor(want))


def _noised(cfg, index, step=3, images=None):
    from megamoe.models.dit.objective import noise_batch

    index = torch.tensor(index)
    if images is None:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (len(index), 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = index % cfg.data.num_classes
    return noise_batch(images, labels, index, step, cfg.run.seed, cfg.model.dit,
                       cfg.data.num_classes), images


def test_draws_are_functions_of_seed_step_and_sample_index():
    """A batch [5, 9, 12] and the same images in another order, or one at a time, get the same
    noise, timestep and drop per sample; another step draws differently (the control)."""
    cfg = _check("model.dit.class_dropout=0.5")
    whole, images = _noised(cfg, [5, 9, 12])
    for order in ([2, 0, 1], [1], [2]):
        part, _ = _noised(cfg, [[5, 9, 12][i] for i in order], images=images[order])
        assert torch.equal(part.x_t_BCHW, whole.x_t_BCHW[order])
        assert torch.equal(part.timesteps_B, whole.timesteps_B[order])
        assert torch.equal(part.labels_B, whole.labels_B[order])
    later, _ = _noised(cfg, [5, 9, 12], step=4, images=images)
    assert not torch.equal(later.x_t_BCHW, whole.x_t_BCHW)
    assert not torch.equal(_noised(load_config(None, [*TINY_DIT, "run.seed=7"]), [5, 9, 12],
                                   images=images)[0].timesteps_B, whole.timesteps_B)


def test_label_drop_rate_and_rectified_flow_by_hand():
    """About `class_dropout` of the labels become the null class; x_t = (1 − σ)x + σε and
    v = ε − x, with ε recovered from the target and σ from the timestep."""
    cfg = _check("model.dit.class_dropout=0.1")
    noised, images = _noised(cfg, list(range(400)))
    assert 0.06 < (noised.labels_B == 6).float().mean().item() < 0.14
    x = images.float() / 127.5 - 1
    eps = noised.target_BCHW + x
    sigma = noised.sigma_B[:, None, None, None]
    assert torch.allclose(noised.timesteps_B, noised.sigma_B * 1000)
    assert torch.allclose(noised.x_t_BCHW, (1 - sigma) * x + sigma * eps, atol=1e-6)
    assert 0.4 < noised.sigma_B.median().item() < 0.6     # logit-normal around 0.5
    assert abs(eps.std().item() - 1) < 0.01


def test_ddpm_noising_matches_diffusers_add_noise():
    from diffusers.schedulers import DDPMScheduler

    cfg = _check("model.dit.objective=ddpm")
    noised, images = _noised(cfg, [1, 2, 3, 4])
    x = images.float() / 127.5 - 1
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2,
                              beta_schedule="linear")
    want = scheduler.add_noise(x, noised.target_BCHW, noised.timesteps_B.long())
    assert torch.allclose(noised.x_t_BCHW, want, atol=1e-5)
    assert noised.timesteps_B.eq(noised.timesteps_B.round()).all()


def model_task(overrides, probe: str):
    """Pool task on one rank: build the tiny DiT and return what `probe` asks for."""
    from megamoe.engines.megatron import build_engine
    from megamoe.models.dit.accounting import parameter_counts
    from megamoe.models.dit.model import predict
    from megamoe.testing.dit import warm_start

    cfg = _check("parallel.world_size=1", *overrides)
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    chunks = engine.modules
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t, y = torch.tensor([100.0, 700.0]), torch.tensor([2, 6])
    if probe == "init":
        built = sum(p.numel() for p in chunks[0].parameters())
        return predict(chunks, x, t, y).abs().max().item(), built, parameter_counts(cfg)[0]
    warm_start(engine)
    if probe == "batch":
        both = predict(chunks, x, t, y)
        alone = torch.cat([predict(chunks, x[i:i + 1], t[i:i + 1], y[i:i + 1])
                           for i in range(2)])
        return (both - alone).abs().max().item(), both.abs().max().item()
    assert probe == "ema", probe
    from megamoe.models.dit.ema import ema_weights

    model = chunks[0]
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.ema.update()     # EMA (reset at the warm start) one step toward θ0 + 1
    d = cfg.model.dit.ema_decay
    rule = max((s - (theta0[n] + (1 - d))).abs().max().item()
               for n, s in zip(model.ema._names, [b for _, b in model.ema.pairs()]))
    trained = predict(chunks, x, t, y)
    with ema_weights(chunks):
        inside = [(p - theta0[n] - (1 - d)).abs().max().item()
                  for n, p in model.named_parameters()]
        averaged = predict(chunks, x, t, y)
    restored = max((p - theta0[n] - 1).abs().max().item() for n, p in model.named_parameters())
    sd = model.sharded_state_dict()
    pairs = [(sh, sd[name[4:].replace("__", ".")]) for name, sh in sd.items()
             if name.startswith("ema.")]
    same_layout = all(a.key == "ema." + b.key and (a.global_shape, a.global_offset, a.replica_id)
                      == (b.global_shape, b.global_offset, b.replica_id) for a, b in pairs)
    n_params = len(list(model.named_parameters()))
    return (rule, max(inside), restored, (trained - averaged).abs().max().item(),
            same_layout, len(pairs), n_params)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", [
    [], DENSE, ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8"],
    ["model.moe.router=diffmoe", "model.moe.topk=1", "model.moe.shared_expert_ffn_hidden_size=0"],
    ["model.moe.router=race", "model.moe.aux_loss_coeff=0", "model.moe.race.plr_coeff=0.1"],
], ids=["dit_moe", "dense", "diff_moe", "diffmoe", "race_plr"])
def test_zero_output_at_initialisation_and_parameter_count(overrides):
    out, built, counted = run_distributed(model_task, 1, overrides, "init")[0]
    assert out == 0.0
    assert built == counted


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides,independent", [
    ([], True), (DENSE, True),
    # control: expert choice over the micro-batch couples the images
    (["model.moe.router=expert_choice", "model.moe.shared_expert_ffn_hidden_size=0",
      "model.moe.aux_loss_coeff=0"], False),
], ids=["dit_moe", "dense", "expert_choice_control"])
def test_prediction_is_independent_of_the_batch(overrides, independent):
    delta, scale = run_distributed(model_task, 1, overrides, "batch")[0]
    assert scale > 1e-3                      # the warm start makes the output non-trivial
    assert (delta <= 1e-5) == independent, delta


@pytest.mark.timeout(300)
def test_ema_update_swap_and_sharding():
    rule, inside, restored, moved, same_layout, n_ema, n_params = \
        run_distributed(model_task, 1, [], "ema")[0]
    assert rule < 1e-6            # θ_ema = d·θ0 + (1 − d)·(θ0 + 1)
    assert inside < 1e-6 and restored < 1e-6
    assert moved > 1e-4           # the EMA weights predict differently (control)
    assert same_layout and n_ema == n_params


def experts_step_task(overrides) -> list:
    """Losses of 2 training steps of the tiny DiT-MoE (warm start) with these experts."""
    from megamoe.testing.dit import dit_parity_task

    return dit_parity_task(["parallel.world_size=1", *overrides], steps=2).losses


@pytest.mark.timeout(300)
def test_grouped_and_fp8_experts_train_in_the_dit():
    """Grouped experts give the sequential experts' losses (1e-5 relative); FP8 experts
    (tensorwise) stay finite and within 2% of them; control: a changed seed moves the loss."""
    base = run_distributed(experts_step_task, 1, ["model.moe.experts=sequential"])[0]
    grouped = run_distributed(experts_step_task, 1, ["model.moe.experts=grouped"])[0]
    fp8 = run_distributed(experts_step_task, 1, ["model.moe.fp8.recipe=tensorwise"])[0]
    other = run_distributed(experts_step_task, 1, ["run.seed=5"])[0]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(base, grouped)), (base, grouped)
    assert all(math.isfinite(b) and abs(a - b) <= 0.02 * abs(a) for a, b in zip(base, fp8))
    assert base != fp8, "FP8 experts computed exactly the fp32 losses: not in use"
    assert any(abs(a - b) > 1e-3 * abs(a) for a, b in zip(base, other)), (base, other)
