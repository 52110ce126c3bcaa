"""Class-conditional sampling from a DiT whole on this process (`megamoe sample`, the metrics
of `megamoe eval`, the diffusers export's reference), with diffusers' schedulers:

- rectified flow: FlowMatchEulerDiscreteScheduler (shift 1), σ from 1 (noise) down to 0 in
  `steps` Euler steps x ← x + (σ_next − σ)·v, the model seeing σ·T — the training objective's
  convention (megamoe.models.dit.objective: x_σ = (1 − σ)·x + σ·ε, v = ε − x = dx/dσ);
- DDPM: DDPMScheduler (the training run's linear β schedule) and its ancestral `step`.

Classifier-free guidance runs the conditional and the unconditional (null class) halves in
one batch, pred = u + s·(c − u); at s = 1 only the conditional half runs (pred = c).

Batch independence. Everything random is a function of (seed, position in the request): the
initial noise, and DDPM's per-step noise (one generator per position). One image sampled
alone therefore starts, and with a batch-independent router stays, where the same position
does inside a larger request; `positions_B` lets a long request be cut into batches.

Shapes: B images, C channels, H, W sides.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from megamoe.models.dit.ema import ema_weights
from megamoe.models.dit.model import CHANNELS, predict

STREAM = 0x5A3   # keeps the sampling draws apart from training's (objective.STREAM)


def make_scheduler(dit, steps: int):
    """The diffusers scheduler of the run's objective, set to `steps` inference steps."""
    if dit.objective == "rectified_flow":
        from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=dit.num_train_timesteps,
                                                    shift=1.0)
    else:
        from diffusers.schedulers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=dit.num_train_timesteps,
                                  beta_start=dit.beta_start, beta_end=dit.beta_end,
                                  beta_schedule="linear", prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    return scheduler


def _seed_of(seed: int, position: int, what: int) -> int:
    """A 64-bit seed for (seed, position, what): one stream per use."""
    state = np.random.SeedSequence([seed, STREAM, what, position]).generate_state(1, np.uint64)
    return int(state[0])


def initial_noise(seed: int, positions_B: Sequence[int], shape_CHW: tuple) -> torch.Tensor:
    """ε [B, C, H, W] float32, image b's a function of (seed, positions_B[b]) alone."""
    return torch.from_numpy(np.stack([
        np.random.default_rng(_seed_of(seed, int(p), 0)).standard_normal(shape_CHW,
                                                                          dtype=np.float32)
        for p in positions_B]))


def step_generators(seed: int, positions_B: Sequence[int]) -> list:
    """One torch generator per image for DDPM's per-step noise (diffusers' `randn_tensor`
    draws image b's noise from generator b)."""
    return [torch.Generator().manual_seed(_seed_of(seed, int(p), 1)) for p in positions_B]


def sample_images(chunks, cfg, labels_B, *, steps: int, cfg_scale: float, seed: int,
                  positions_B: Sequence[int] | None = None, ema: bool = True,
                  progress: Callable | None = None, on_step: Callable | None = None
                  ) -> torch.Tensor:
    """Images [B, C, H, W] in [0, 1] for the class labels `labels_B` (the null class
    `data.num_classes` samples unconditionally) after `steps` scheduler steps with guidance
    scale `cfg_scale`, from the EMA weights unless `ema` is False.

    positions_B: each image's position in the request (default 0…B−1), which with `seed` fixes
    its noise. progress: wraps the step iterable (e.g. tqdm). on_step(i, timestep, x_BCHW):
    called after the model's evaluation at step i (timestep in the model's units, x the
    current noisy images in [−1, 1]) — where routers' statistics of that forward can be read.
    """
    labels_B = torch.as_tensor(labels_B, dtype=torch.long).reshape(-1)
    num_classes, dit = cfg.data.num_classes, cfg.model.dit
    if steps < 1:
        raise ValueError(f"steps={steps}: must be ≥ 1")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale={cfg_scale}: must be ≥ 0")
    if labels_B.numel() and not (0 <= labels_B.min() and labels_B.max() <= num_classes):
        raise ValueError(f"labels {labels_B.tolist()}: must be in [0, {num_classes}] "
                         f"({num_classes} is the null class)")
    B = labels_B.numel()
    positions_B = list(range(B)) if positions_B is None else [int(p) for p in positions_B]
    assert len(positions_B) == B, (len(positions_B), B)
    side = cfg.data.image_size
    x_BCHW = initial_noise(seed, positions_B, (CHANNELS, side, side))
    scheduler = make_scheduler(dit, steps)
    generators = step_generators(seed, positions_B) if dit.objective == "ddpm" else None
    guided = cfg_scale != 1.0
    labels_in = torch.cat([labels_B, torch.full_like(labels_B, num_classes)]) if guided \
        else labels_B
    order = range(len(scheduler.timesteps))
    device = next(getattr(chunks[0], "module", chunks[0]).parameters()).device
    with ema_weights(chunks) if ema else contextlib.nullcontext():
        for i in (progress(order) if progress is not None else order):
            t = scheduler.timesteps[i]
            x_in = torch.cat([x_BCHW, x_BCHW]) if guided else x_BCHW
            t_in = torch.full((x_in.shape[0],), float(t), dtype=torch.float32)
            pred = predict(chunks, x_in.to(device), t_in, labels_in).float().cpu()
            if guided:
                cond, uncond = pred.chunk(2)
                pred = uncond + cfg_scale * (cond - uncond)
            if on_step is not None:
                on_step(i, float(t), x_BCHW)
            if generators is None:
                x_BCHW = scheduler.step(pred, t, x_BCHW, return_dict=False)[0]
            else:
                x_BCHW = scheduler.step(pred, t, x_BCHW, generator=generators,
                                        return_dict=False)[0]
    return ((x_BCHW.float() + 1) / 2).clamp(0, 1)

