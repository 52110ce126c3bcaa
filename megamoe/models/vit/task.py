"""The `vit` family's task: image classification on the shapes set (or any source yielding
(images [B, 3, H, W] uint8, labels [B])).

A micro-batch holds the images, their labels and each image's global `sample_index`
(megamoe.data.loader). The loss unit is the image: a micro-batch returns the sum of its
per-image cross-entropies and its image count, which Megatron divides by the global count
(`calculate_per_token_loss`), so any DP size and micro-batch split gives the same gradients.
The forward step also counts correct top-1 predictions (`correct`), which `megamoe eval` and
the validation pass sum into accuracies.

Shapes: B images.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from megamoe.config.vision import image_tokens


def _loss_func(labels_B: torch.Tensor, output):
    """(sum of per-image losses, image count, stats); stats also carry the correct count."""
    loss_B, logits_BK = output
    loss_sum = loss_B.float().sum()
    n = torch.tensor(loss_B.shape[0], dtype=torch.int)
    correct = (logits_BK.argmax(dim=-1) == labels_B).sum().float()
    stats = torch.stack([loss_sum.detach(), n.float(), correct.detach()])
    return loss_sum, n, {"loss": stats}


class LabelledImages:
    """Micro-batches of labelled images, one loss unit per image (the vit and dit tasks)."""
    unit = "image"

    def collate(self, samples, sample_index_B) -> dict:
        images_BCHW, labels_B = samples
        return {"images": torch.as_tensor(np.asarray(images_BCHW)),
                "labels": torch.as_tensor(np.asarray(labels_B), dtype=torch.long),
                "sample_index": torch.as_tensor(np.asarray(sample_index_B), dtype=torch.long)}

    def micro_batch_size(self, batch: dict) -> int:
        return batch["images"].shape[0]

    def units_per_sample(self) -> int:
        return 1


class ViTTask(LabelledImages):
    stat_names = ("loss_sum", "units", "correct")   # what each micro-batch's stats hold

    def __init__(self, cfg):
        self.cfg = cfg
        self.seq_length = image_tokens(cfg)     # the pipeline's activation shape

    def forward_step(self, model, batch: dict, device: torch.device, step: int):
        """(output, loss function) of one micro-batch, Megatron's forward-step convention; the
        last stage's output is (per-image losses, logits)."""
        from megamoe.models.vit.model import vit_context

        labels = batch["labels"].to(device)
        output = model(batch["images"].to(device), labels, context=vit_context(batch, step))
        return output, partial(_loss_func, labels)
