"""The vlm family on packed sequences (`data.packing`): what the config may combine with it, and
the micro-batch of a list of packed sequences (megamoe.data.pack).

Order. The generated scenes are random access: the loader hands each DP rank its
`train.micro_batch_size` samples of the step (megamoe.data.loader: a function of consumed
samples, independent of the DP size), and the task packs each `data.pack_samples` = k
consecutive ones into a sequence, so a micro-batch of b samples is b / k rows and the order
rule, resume and parity with one process hold unchanged. A streaming source packs greedily
from its stream (`megamoe.data.pack.plan_packs`) and hands the task the packed sequences.
A fixed k saves no padding on the scenes (a row must hold k of the longest sample, as an
unpacked row holds one); it makes the packed path run under the order rule. Greedy packing of
a stream into a length set by the budget, not the longest sample, is where the tokens are won.

Loss. Each sample's answer-token losses are those it has unpacked (a test holds them equal),
so the reported loss is too; the router losses are not: the micro-batch's pool now holds less
padding (4 quickstart steps: the same losses at steps 1, 2 and 4, step 3 off by 0.05 %).

Routers. A packed row holds several samples; attention keeps them apart, but MoE routing runs
over the row's and the micro-batch's tokens. Token-choice routers without capacity decide per
token, so a token's expert and weight are what they are unpacked: allowed (`PACKING_ROUTERS`).
Capacity dropping, expert-choice, Soft MoE slots, Expert Race, DiffMoE's pool (cross-token
selection), V-MoE/LIMoE (noise and priority per sample index: a row has several) and Diff-MoE
(the synthetic timestep of a row's first token) would see rows of several samples: refused,
as are the per-sequence Switch loss (`aux_loss_type: sequence`, a pool of several samples),
the contrastive loss (one caption pass per sample), the encoder's own grid and MoR LMs (not
built for packed rows). The causality rule (megamoe.moe.routers) applies unchanged.

Shapes: R packed rows, S positions, N samples of the micro-batch (= images).
"""

from __future__ import annotations

import numpy as np
import torch

from megamoe.config.errors import fail
from megamoe.data.scenes import CAPTION

PACKING_ROUTERS = ("topk", "dit_moe", "moee", "modality")


def check_packing(cfg) -> None:
    """One line naming the field for a config that packing does not support."""
    from megamoe.blocks.packed import check_packed_attention
    from megamoe.config.vlm import image_tokens
    from megamoe.data.scenes import max_sample_length

    d, m, moe = cfg.data, cfg.model, cfg.model.moe
    check_packed_attention(d.packed_attention)
    k = d.pack_samples
    if cfg.train.micro_batch_size % k:
        fail("data.pack_samples", f"{k} does not divide train.micro_batch_size "
             f"({cfg.train.micro_batch_size}), which counts samples: a micro-batch is "
             f"micro_batch_size / pack_samples packed sequences")
    # energon: packs are planned greedily from the samples' lengths (megamoe.data.energon_encoder)
    longest = (max_sample_length(image_tokens(cfg), d.max_shapes, d.caption_fraction)
               if d.kind == "scenes" else 0)
    if k * longest > m.seq_length + 1:
        fail("model.seq_length", f"{m.seq_length} is too short to pack data.pack_samples = {k} "
             f"samples of up to {longest} tokens: it must be >= {k * longest - 1}")
    if m.vlm.contrastive_coeff > 0:
        fail("model.vlm.contrastive_coeff", "the contrastive loss runs one caption pass per "
             "unpacked sample: set it 0 with data.packing")
    if cfg.parallel.vision_tensor is not None:
        fail("parallel.vision_tensor", "the encoder's own grid is not built for packed "
             "micro-batches: leave it unset with data.packing")
    if m.mor.enabled:
        fail("model.mor.enabled", "Mixture-of-Recursions LMs build their own attention masks "
             "and positions: packing is not supported for them")
    if moe.num_experts:
        if moe.router not in PACKING_ROUTERS:
            fail("model.moe.router", f"'{moe.router}' selects or conditions across a packed "
                 f"row's samples; with data.packing use one of {', '.join(PACKING_ROUTERS)}")
        if moe.capacity_factor is not None:
            fail("model.moe.capacity_factor", "capacity dropping lets a packed row's samples "
                 "compete for expert slots: leave it unset (dropless) with data.packing")
        if moe.aux_loss_type == "sequence" and moe.aux_loss_coeff > 0:
            fail("model.moe.aux_loss_type", "'sequence' balances each row, which holds several "
                 "samples when packed: use 'switch' or 'global' with data.packing")


def collate_packed(packs: list[dict], sample_index_N) -> dict:
    """The vlm micro-batch (megamoe.models.vlm.task) of R packed sequences
    (megamoe.data.pack.pack_samples) whose N samples carry the global positions
    `sample_index_N`: tokens, labels, loss mask, positions and segment ids [R, S]; images,
    sample indices, caption flags and caption tokens [N] in pack order."""
    def stacked(key, dtype):
        return torch.as_tensor(np.stack([p[key] for p in packs]), dtype=dtype)

    def per_sample(key):
        return np.asarray([x for p in packs for x in p[key]])

    tokens_RS1 = stacked("tokens", torch.long)
    images_NCHW = torch.as_tensor(np.concatenate([p["images"] for p in packs]))
    assert len(sample_index_N) == len(images_NCHW), (len(sample_index_N), len(images_NCHW))
    return {"tokens": tokens_RS1[:, :-1].contiguous(),
            "labels": tokens_RS1[:, 1:].contiguous(),
            "loss_mask": stacked("loss_mask", torch.float),
            "position_ids": stacked("position_ids", torch.long),
            "segment_ids": stacked("segment_ids", torch.long),
            "images": images_NCHW,
            "sample_index": torch.as_tensor(np.asarray(sample_index_N), dtype=torch.long),
            "is_caption": torch.as_tensor(per_sample("template") == CAPTION),
            "caption_tokens": torch.as_tensor(per_sample("caption_tokens"), dtype=torch.long),
            "caption_end": torch.as_tensor(per_sample("caption_end"), dtype=torch.long)}
