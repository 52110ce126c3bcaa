"""The `vlm` family's task: image + text samples (megamoe.data.scenes: an image, and a token
sequence [<bos>, <image>×n, prompt…, answer…, <eos>, <pad>…]) trained with next-token loss on
the answer tokens only.

A micro-batch holds the images, the input tokens and their next-token labels, the loss mask
(answer words and <eos>), each sample's question template and global `sample_index`. The loss
unit is the answer token: a micro-batch returns the sum of its answer-token losses and their
count, which Megatron divides by the global count (`calculate_per_token_loss`), so any layout
gives the same gradients. The forward step also counts samples answered exactly (every answer
token's argmax is its label — under teacher forcing this is the same as greedy decoding
reproducing the answer): `correct` of `questions`, and `caption_match` of `captions`.

Contexts: the LM stream's modality ids are 1 at the image placeholders and 0 on text; the
encoder stream's are all 1 (megamoe.models.vlm.model).

Packed (`data.packing`, megamoe.models.vlm.packing): each row holds several samples with
segment ids and per-sample positions; the decoder gets a block-diagonal causal mask, images and
per-sample entries are per sample (N of them) and the exact-answer counts are per sample.

Shapes: B micro-batch (rows), S sequence, N samples (B unpacked).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from megamoe.blocks.context import Context
from megamoe.config.vlm import IMAGE_TOKEN_ID, PAD_TOKEN_ID, encoder_tokens
from megamoe.data.scenes import CAPTION


def _loss_func(loss_mask_BS: torch.Tensor, is_caption_N: torch.Tensor, coeff: float,
               dp_group, samples_BS: torch.Tensor, output):
    """(answer-token loss sum [+ coeff × the contrastive loss in answer-token units],
    answer-token count, stats): stats also count exact answers and the contrastive loss, per
    sample (`samples_BS`: each position's sample in the micro-batch, −1 on packing's padding;
    a row's number unpacked)."""
    from megamoe.blocks.packed import per_sample_sum
    from megamoe.models.contrastive import in_units_of

    loss_BS, correct_BS = output[:2]
    mask_BS = loss_mask_BS.float()
    lm_sum = (loss_BS.float() * mask_BS).sum()
    n = mask_BS.sum()
    pair_sum = pairs = torch.zeros((), device=n.device)
    loss_sum = lm_sum
    if len(output) > 2:        # the contrastive (loss sum, pairs) of the micro-batch
        pair_sum, pairs = output[2]
        loss_sum = lm_sum + coeff * in_units_of(pair_sum, pairs, n, dp_group)
    N = len(is_caption_N)
    answered_N = per_sample_sum(mask_BS, samples_BS, N) > 0
    wrong_N = per_sample_sum(((~correct_BS) & (mask_BS > 0)).float(), samples_BS, N)
    exact_N = ((wrong_N == 0) & answered_N).float()
    question_N = (answered_N & ~is_caption_N).float()
    caption_N = (answered_N & is_caption_N).float()
    stats = torch.stack([lm_sum.detach(), n, (exact_N * question_N).sum(), question_N.sum(),
                         (exact_N * caption_N).sum(), caption_N.sum(),
                         pair_sum.detach().float(), torch.as_tensor(pairs).float()])
    return loss_sum, n.to(torch.int), {"loss": stats}


class VLMTask:
    unit = "token"
    stat_names = ("loss_sum", "units", "correct", "questions", "caption_match", "captions",
                  "contrastive_sum", "pairs")
    accuracy_per = "questions"    # the loop's validation accuracy: correct / questions

    def __init__(self, cfg):
        self.cfg = cfg
        self.contrastive_coeff = cfg.model.vlm.contrastive_coeff
        # the contrastive loss's negatives are the DP ranks' micro-batches m together: a
        # single-process reference must run them as one micro-batch (megamoe.testing.parity)
        self.couples_dp_micro_batches = self.contrastive_coeff > 0
        self.seq_length = cfg.model.seq_length   # the pipeline's activation shape
        self.encoder_tokens = encoder_tokens(cfg)   # the encoder stream's sequence
        # data.packing: k samples per sequence (megamoe.models.vlm.packing)
        self.pack_k = cfg.data.pack_samples if cfg.data.packing else None

    def collate(self, samples, sample_index_B) -> dict:
        """The micro-batch of the loader's stacked samples (packed k at a time with
        data.packing), or of a list of packed sequences (a streaming source's, packed with
        megamoe.data.pack; `sample_index_B` then holds one global position per packed sample,
        in pack order)."""
        if isinstance(samples, list) or self.pack_k:
            from megamoe.data.pack import pack_fixed
            from megamoe.models.vlm.packing import collate_packed

            packs = samples if isinstance(samples, list) else \
                pack_fixed(samples, self.seq_length, self.pack_k)
            return collate_packed(packs, sample_index_B)
        tokens_BS1 = torch.as_tensor(np.asarray(samples["tokens"]), dtype=torch.long)
        B, S1 = tokens_BS1.shape
        return {"images": torch.as_tensor(np.asarray(samples["images"])),
                "tokens": tokens_BS1[:, :-1].contiguous(),
                "labels": tokens_BS1[:, 1:].contiguous(),
                "loss_mask": torch.as_tensor(np.asarray(samples["loss_mask"]),
                                             dtype=torch.float),
                "position_ids": torch.arange(S1 - 1).unsqueeze(0).expand(B, -1).contiguous(),
                "is_caption": torch.as_tensor(np.asarray(samples["template"]) == CAPTION),
                "sample_index": torch.as_tensor(np.asarray(sample_index_B), dtype=torch.long),
                "caption_tokens": torch.as_tensor(np.asarray(samples["caption_tokens"]),
                                                  dtype=torch.long),
                "caption_end": torch.as_tensor(np.asarray(samples["caption_end"]),
                                               dtype=torch.long)}

    def micro_batch_size(self, batch: dict) -> int:
        return batch["tokens"].shape[0]

    def units_per_sample(self) -> float:
        """Tokens per sample: the loop's throughput and consumed-token counts (packed: a
        sequence's share)."""
        return self.cfg.model.seq_length / (self.pack_k or 1)

    def context(self, batch: dict, step: int | None) -> Context:
        """The LM stream's context: sample indices, labels, modality ids (1 = image), the
        padding (routed nowhere by the LM's MoE layers); a packed batch's segment ids as the
        sequence ids (a row has no one sample index)."""
        packed = "segment_ids" in batch
        return Context(sample_index_B=None if packed else batch.get("sample_index"),
                       modality_ids_BS=(batch["tokens"] == IMAGE_TOKEN_ID).long(),
                       padding_mask_BS=batch["tokens"] == PAD_TOKEN_ID,
                       sequence_ids_BS=batch.get("segment_ids"),
                       labels_BS=batch.get("labels"), step=step)

    def forward_step(self, model, batch: dict, device: torch.device, step: int):
        """(output, loss function) of one micro-batch, Megatron's forward-step convention:
        every pipeline stage builds both contexts (nothing is sent point to point)."""
        from megamoe.models.vlm.model import vision_context

        captions = {}
        if self.contrastive_coeff > 0:
            captions = {"caption_tokens": batch["caption_tokens"].to(device),
                        "caption_end": batch["caption_end"].to(device)}
        mask, samples_BS = attention_of(batch)
        output = model(batch["tokens"].to(device), batch["position_ids"].to(device),
                       None if mask is None else mask.to(device),
                       images=batch["images"].to(device), labels=batch["labels"].to(device),
                       context=self.context(batch, step),
                       vision_context=vision_context(batch, step, self.encoder_tokens),
                       **captions)
        dp_group = getattr(model, "module", model).pg_collection.dp
        return output, partial(_loss_func, batch["loss_mask"].to(device),
                               batch["is_caption"].to(device), self.contrastive_coeff, dp_group,
                               samples_BS.to(device))


def attention_of(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the decoder's attention mask: block-diagonal causal for a packed batch, None — the
    spec's causal mask — otherwise; each position's sample in the micro-batch [B, S])."""
    from megamoe.blocks.packed import block_causal_mask, sample_numbers

    if "segment_ids" in batch:
        return block_causal_mask(batch["segment_ids"]), sample_numbers(batch["segment_ids"])[0]
    B, S = batch["tokens"].shape
    return None, torch.arange(B).unsqueeze(1).expand(B, S)
