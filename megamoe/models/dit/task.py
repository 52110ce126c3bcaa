"""The `dit` family's task: denoising on the shapes set (any source yielding (images [B, 3, H, W]
uint8, labels [B])).

A micro-batch holds the clean images, their labels and each image's global `sample_index`.
The context carries the patchified target per token too (Race's PLR head predicts it).
The noise, timestep and label drop of each image come from (run.seed, step, sample index)
(megamoe.models.dit.objective), on every pipeline stage alike; in evaluation the draws of step 0,
so a held-out loss sees the same (x, ε, t, label drop) at every step. The loss unit is the image: a
micro-batch returns the sum of its per-image mean squared errors and its image count, which
Megatron divides by the global count (`calculate_per_token_loss`), so any DP size and
micro-batch split gives the same gradients.

Shapes: B images.
"""

from __future__ import annotations

import torch

from megamoe.blocks.embeddings import patchify
from megamoe.config.diffusion import dit_tokens
from megamoe.models.vit.task import LabelledImages


def _loss_func(output):
    """(sum of per-image losses, image count, stats)."""
    loss_B = output
    loss_sum = loss_B.float().sum()
    n = torch.tensor(loss_B.shape[0], dtype=torch.int)
    return loss_sum, n, {"loss": torch.stack([loss_sum.detach(), n.float()])}


class DiTTask(LabelledImages):
    stat_names = ("loss_sum", "units")

    def __init__(self, cfg):
        self.cfg = cfg
        self.seq_length = dit_tokens(cfg)     # the pipeline's activation shape

    def noised(self, batch: dict, step: int):
        from megamoe.models.dit.objective import noise_batch

        return noise_batch(batch["images"], batch["labels"], batch["sample_index"], step,
                           self.cfg.run.seed, self.cfg.model.dit, self.cfg.data.num_classes)

    def forward_step(self, model, batch: dict, device: torch.device, step: int):
        """(output, loss function) of one micro-batch, Megatron's forward-step convention; the
        last stage's output is the per-image loss [B]."""
        from megamoe.models.dit.model import dit_context

        draw_step = step if model.training else 0     # held-out losses: fixed (x, ε, t)
        noised = self.noised(batch, draw_step)
        targets_BSP = patchify(noised.target_BCHW, self.cfg.model.dit.patch_size)
        context = dit_context(batch["sample_index"], noised.timesteps_B, noised.labels_B, step,
                              targets_BSP=targets_BSP)
        output = model(noised.x_t_BCHW.to(device), noised.target_BCHW.to(device),
                       context=context)
        return output, _loss_func
