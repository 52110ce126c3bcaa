"""The diffusion objective of the `dit` family (papers.md §6, §8b): what a clean image x
becomes in training, as pure functions of (seed, step, global sample index), so every layout
(DP split, micro-batching, pipeline stage) draws the same noise for the same sample.

- Rectified flow (default; DiT-MoE and DiffMoE ship it): σ = sigmoid(m + s·n), n ~ N(0, 1)
  (logit-normal, Esser et al. 2024), x_t = (1 − σ)·x + σ·ε, target v = ε − x; the timestep
  embedder sees σ·T (diffusers' FlowMatchEulerDiscreteScheduler's timesteps).
- DDPM (DiT's): t ~ U{0, …, T − 1}, x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε, target ε; ᾱ from
  diffusers' DDPMScheduler on the linear β schedule; the embedder sees t.
- Classifier-free guidance: the label becomes the null class (`num_classes`) with probability
  `class_dropout`.

Per sample, one numpy generator seeded by (seed, stream, step, index) draws, in this order:
ε (C·H·W normals), the timestep variable, the drop's uniform.

Shapes: B images, C channels, H, W sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

STREAM = 0xD17   # keeps these draws apart from any other consumer of (seed, step, index)


@dataclass
class NoisedBatch:
    x_t_BCHW: torch.Tensor       # the model's input
    target_BCHW: torch.Tensor    # v = ε − x (rectified flow) or ε (DDPM)
    timesteps_B: torch.Tensor    # what the timestep embedder sees (float)
    labels_B: torch.Tensor       # after the classifier-free-guidance drop
    sigma_B: torch.Tensor        # σ (rectified flow) or √(1 − ᾱ_t) (DDPM): the noise share


def images_to_unit(images_BCHW: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float in [−1, 1] (the patch embedding's own scaling)."""
    return images_BCHW.float() / 127.5 - 1.0


@lru_cache(maxsize=4)
def ddpm_alphas_cumprod(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """ᾱ_t [T] of diffusers' DDPMScheduler with the linear β schedule."""
    from diffusers.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule="linear")
    return scheduler.alphas_cumprod.float().clone()


def sample_draws(seed: int, step: int, index: int, shape_CHW: tuple, dit) -> tuple:
    """(ε [C, H, W] float32, timestep variable, drop: bool) of one sample; the timestep
    variable is n ~ N(0, 1) for rectified flow, an integer t < T for DDPM."""
    rng = np.random.default_rng([seed, STREAM, step, index])
    eps = rng.standard_normal(shape_CHW, dtype=np.float32)
    if dit.objective == "rectified_flow":
        timestep = float(rng.standard_normal())
    else:
        timestep = int(rng.integers(0, dit.num_train_timesteps))
    drop = bool(rng.random() < dit.class_dropout)
    return eps, timestep, drop


def noise_batch(images_BCHW: torch.Tensor, labels_B: torch.Tensor,
                sample_index_B: torch.Tensor, step: int, seed: int, dit,
                num_classes: int) -> NoisedBatch:
    """The training inputs and target of a micro-batch (module docstring)."""
    x_BCHW = images_to_unit(images_BCHW)
    shape = tuple(x_BCHW.shape[1:])
    draws = [sample_draws(seed, step, int(g), shape, dit) for g in sample_index_B.tolist()]
    eps_BCHW = torch.from_numpy(np.stack([d[0] for d in draws]))
    raw_B = torch.tensor([d[1] for d in draws], dtype=torch.float64)
    drop_B = torch.tensor([d[2] for d in draws], dtype=torch.bool)
    labels_B = torch.where(drop_B, torch.full_like(labels_B, num_classes), labels_B)
    T = dit.num_train_timesteps
    if dit.objective == "rectified_flow":
        sigma_B = torch.sigmoid(dit.logit_mean + dit.logit_std * raw_B).float()
        s = sigma_B[:, None, None, None]
        return NoisedBatch((1 - s) * x_BCHW + s * eps_BCHW, eps_BCHW - x_BCHW, sigma_B * T,
                           labels_B, sigma_B)
    alpha_bar_B = ddpm_alphas_cumprod(T, dit.beta_start, dit.beta_end)[raw_B.long()]
    a = alpha_bar_B.sqrt()[:, None, None, None]
    sigma_B = (1 - alpha_bar_B).sqrt()
    return NoisedBatch(a * x_BCHW + sigma_B[:, None, None, None] * eps_BCHW, eps_BCHW,
                       raw_B.float(), labels_B, sigma_B)
