"""`megamoe eval` figures of a vlm run on Energon shards (`data.kind: energon`), where no
generator knows the answers: the image-blind chance and the neighbour-image control are taken
from the evaluated validation batches themselves.

- `chance`: leave-one-out majority answer per exact question (the input tokens up to the first
  answer token: <bos>, the image placeholders and the prompt): each question is answered with
  the most frequent answer among the *other* evaluated samples that ask the same thing, wrong if
  none does. This is what an image-blind model could learn from this distribution; it uses the
  validation answers (no training split is read), so it is optimistic, not pessimistic.
- `caption_chance`: the same rule over captioning samples.
- `shuffled_accuracy`: every micro-batch's images rolled by one (sample i gets sample i+1's
  image, the last gets the first), which needs ≥ 2 images per micro-batch.
Packed rows (`segment_ids`) are split into their samples.

Shapes: B rows, S positions, N images of a micro-batch.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch


def _samples(batch: dict):
    """(question key, answer, is caption) of every sample of a collated micro-batch, in the
    order of its images (rows, then the samples packed in a row)."""
    tokens_BS, labels_BS, mask_BS = batch["tokens"], batch["labels"], batch["loss_mask"] > 0
    segments_BS = batch.get("segment_ids")
    if segments_BS is None:
        segments_BS = torch.zeros_like(tokens_BS)
    captions = iter(batch["is_caption"].tolist())
    for b in range(tokens_BS.shape[0]):
        for s in sorted(set(segments_BS[b].tolist()) - {-1}):
            positions = (segments_BS[b] == s).nonzero().flatten()
            answer_at = positions[mask_BS[b, positions]]
            is_caption = next(captions)
            if len(answer_at):
                key = tuple(tokens_BS[b, positions[positions <= answer_at[0]]].tolist())
                yield key, tuple(labels_BS[b, answer_at].tolist()), is_caption


def leave_one_out_majority(pairs: list[tuple]) -> float:
    """Accuracy of answering each (key, answer) with the most frequent answer among the other
    pairs of its key (ties: the answer seen first); 0 for a key seen once. Empty: 0."""
    by_key: dict = defaultdict(Counter)
    for key, answer in pairs:
        by_key[key][answer] += 1
    right = 0
    for key, answer in pairs:
        counts = by_key[key].copy()
        counts[answer] -= 1
        best = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
        right += best[1] > 0 and best[0] == answer
    return right / len(pairs) if pairs else 0.0


def blind_figures_from_batches(loader, iters: int, G: int) -> dict:
    """`chance` and `caption_chance` of the first `iters` validation batches (module
    docstring)."""
    questions, captions = [], []
    for i in range(iters):
        for batch in loader.peek(i * G):
            for key, answer, is_caption in _samples(batch):
                (captions if is_caption else questions).append((key, answer))
    return {"chance": leave_one_out_majority(questions), "chance_rule":
            "leave-one-out majority answer per question over the evaluated batches",
            "caption_chance": leave_one_out_majority(captions)}


class NeighbourInBatch:
    """A loader whose micro-batches carry their images rolled by one (sample i sees sample
    i + 1's image within the micro-batch)."""

    def __init__(self, loader):
        self.loader = loader

    def peek(self, consumed_samples: int) -> list:
        out = []
        for batch in self.loader.peek(consumed_samples):
            images_N = batch["images"]
            if images_N.shape[0] < 2:
                raise ValueError("train.micro_batch_size: the neighbour-image control of "
                                 "`megamoe eval` on shards rolls images within a micro-batch, "
                                 "which needs at least 2 of them")
            out.append(dict(batch, images=torch.roll(images_N, -1, dims=0)))
        return out
