"""Synthetic routing context for language-model runs of context-routed families.

Modality-routed (VLMo, Uni-MoE, LIMoE) and timestep-routed (Diff-MoE, DiT-MoE) routers are
exercised on the LM with context computed from the micro-batch's tokens alone, so a parallel run
and its single-process reference (which see the same samples) get the same context, and every
pipeline stage can build it without communication:

- modality id of a token = token id mod M (`data.synthetic_modalities: M`);
- timestep of a sample = (first token id · 37) mod 1000 (it must not depend on later tokens,
  or it would carry the future into every position), embedded sinusoidally to
  `model.hidden_size` (`data.synthetic_timesteps: true`), like a diffusion model's t-embedding.

Shapes: B batch, S sequence, D embedding width.
"""

from __future__ import annotations

import math

import torch

NUM_TIMESTEPS = 1000


def modality_ids(tokens_BS: torch.Tensor, num_modalities: int) -> torch.Tensor:
    return tokens_BS.long() % num_modalities


def timesteps(tokens_BS: torch.Tensor) -> torch.Tensor:
    return (tokens_BS[:, 0].long() * 37) % NUM_TIMESTEPS


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[B, dim]: cos/sin of t at geometrically spaced frequencies (DDPM/DiT convention)."""
    half = dim // 2
    freqs_H = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles_BH = t_B.float()[:, None] * freqs_H[None]
    emb_BD = torch.cat([torch.cos(angles_BH), torch.sin(angles_BH)], dim=-1)
    if dim % 2:
        emb_BD = torch.cat([emb_BD, torch.zeros_like(emb_BD[:, :1])], dim=-1)
    return emb_BD


def timestep_embedding_width(data_cfg, hidden_size: int) -> int | None:
    """The width of the timestep embedding `context_fields` provides (None: none)."""
    return hidden_size if data_cfg.synthetic_timesteps else None


def context_fields(tokens_BS: torch.Tensor, data_cfg, hidden_size: int) -> dict:
    """Keyword arguments for `Context` (megamoe.blocks.context) from the config's
    synthetic-context switches."""
    fields = {}
    if data_cfg.synthetic_modalities:
        fields["modality_ids_BS"] = modality_ids(tokens_BS, data_cfg.synthetic_modalities)
    if data_cfg.synthetic_timesteps:
        fields["timestep_emb_BD"] = timestep_embedding(timesteps(tokens_BS), hidden_size)
    return fields
