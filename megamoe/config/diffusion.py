"""Options of the `dit` family (`model.dit`): a class-conditional diffusion transformer in pixel
space (DiT, Peebles & Xie 2023; DiT-MoE, papers.md §6; DiffMoE, §8b) on the shapes images.
The transformer itself uses `model`'s common keys (layers, width, heads, FFN, MoE).

Images of `data.image_size` are cut into `patch_size` patches (32×32 with patch 4 → 64 tokens)
with fixed 2-D sin-cos positions. The objective is rectified flow by default, as DiT-MoE and
DiffMoE ship it: x_t = (1 − σ)·x + σ·ε, target v = ε − x, σ = t drawn logit-normal
(σ = sigmoid(m + s·n), n ~ N(0, 1); Esser et al. 2024's m = 0, s = 1); `ddpm` is DiT's
ε-prediction on a linear β schedule (β from `beta_start` to `beta_end` over
`num_train_timesteps`, diffusers' DDPMScheduler). The timestep embedder sees t·T for rectified
flow (T = num_train_timesteps, the scale of diffusers' flow-matching timesteps) and the integer
step for DDPM. Labels are replaced by the null class with probability `class_dropout`
(classifier-free guidance). Parameters are averaged with decay `ema_decay` after every optimizer
step (the weights used for sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megamoe.config.errors import at_least, fail, greater_than, in_range, one_of

OBJECTIVES = ("rectified_flow", "ddpm")


@dataclass
class DiTOptions:
    SECTION: ClassVar[str] = "model.dit"

    patch_size: int = 4
    objective: str = "rectified_flow"   # rectified_flow (v = ε − x) | ddpm (ε-prediction)
    logit_mean: float = 0.0             # rectified flow: σ = sigmoid(logit_mean + logit_std·n)
    logit_std: float = 1.0
    num_train_timesteps: int = 1000     # T: DDPM's steps; rectified flow's timestep scale
    beta_start: float = 1.0e-4          # DDPM's linear β schedule (DiT's)
    beta_end: float = 2.0e-2
    class_dropout: float = 0.1          # P(label → null class), for classifier-free guidance
    frequency_embedding_size: int = 256  # sinusoid width fed to the timestep MLP (DiT's 256)
    ema_decay: float = 0.9999           # EMA of the weights after each optimizer step

    def validate(self) -> None:
        at_least(self, "patch_size", 1)
        one_of(self, "objective", OBJECTIVES)
        greater_than(self, "logit_std", 0)
        at_least(self, "num_train_timesteps", 2)
        greater_than(self, "beta_start", 0)
        if not self.beta_end > self.beta_start or not self.beta_end < 1:
            fail("model.dit.beta_end", f"must be in (beta_start, 1) = ({self.beta_start}, 1), "
                 f"got {self.beta_end!r}")
        in_range(self, "class_dropout", 0, 1, high_open=True)
        at_least(self, "frequency_embedding_size", 2)
        if self.frequency_embedding_size % 2:
            fail("model.dit.frequency_embedding_size", f"must be even (sin and cos halves), "
                 f"got {self.frequency_embedding_size}")
        in_range(self, "ema_decay", 0, 1)


def dit_grid_side(cfg) -> int:
    """Patches per image side; ConfigError naming the field when the patch does not tile the
    image."""
    size, patch = cfg.data.image_size, cfg.model.dit.patch_size
    if size % patch:
        fail("model.dit.patch_size", f"{patch} does not divide data.image_size ({size})")
    return size // patch


def dit_tokens(cfg) -> int:
    """Tokens per image: one per patch (no class token; the class conditions the norms)."""
    return dit_grid_side(cfg) ** 2
