"""The `lm` family's task: a causal language model fed token windows.

A micro-batch is [b, S+1] token samples collated into inputs, next-token labels, a loss mask and
positions, plus each sample's global `sample_index` (megamoe.data.loader). The forward step
builds the Context from the micro-batch (on every pipeline stage: nothing is sent point to
point) and returns Megatron's per-token loss convention: the sum of the token losses and the
token count, which Megatron divides by the global count (`calculate_per_token_loss`), so any DP
size and micro-batch split gives the same gradients.

Shapes: B micro-batch, S sequence.
"""

from __future__ import annotations

from functools import partial

import torch

from megamoe.data.batches import collate_tokens


def _loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    """Sum of the token losses and the token count; Megatron divides by the global count."""
    mask = loss_mask_BS.reshape(-1).float()
    loss_sum = (output_BS.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum()])}


class LMTask:
    unit = "token"

    def __init__(self, cfg):
        self.cfg = cfg
        self.seq_length = cfg.model.seq_length   # the pipeline's activation shape

    def collate(self, samples_BS1, sample_index_B) -> dict:
        return collate_tokens(samples_BS1, sample_index_B)

    def micro_batch_size(self, batch: dict) -> int:
        return batch["tokens"].shape[0]

    def units_per_sample(self) -> int:
        """Tokens per sample: the loop's throughput and consumed-token counts."""
        return self.cfg.model.seq_length

    def forward_step(self, model, batch: dict, device: torch.device, step: int):
        """(output, loss function) of one micro-batch, Megatron's forward-step convention.
        Every pipeline stage builds the micro-batch's context and hands it to the model, which
        binds it for its layers during the call (megamoe.models.lm.model.LMModel)."""
        from megamoe.models.lm.model import lm_context

        tokens = batch["tokens"].to(device)
        output = model(tokens, batch["position_ids"].to(device), None,
                       labels=batch["labels"].to(device),
                       context=lm_context(batch, self.cfg, step))
        return output, partial(_loss_func, batch["loss_mask"].to(device))
