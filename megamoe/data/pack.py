"""Packing several image+text samples into one sequence (issue 16 item 3), for the `vlm` family.

A sample (megamoe.data.scenes: `ScenesDataset.__getitem__`, or the same dict from another
source) is tokens [S + 1] = [<bos>, <image>×n, prompt…, answer…, <eos>, <pad>…] with a loss mask
[S] aligned to tokens[1:]. Packing strips each sample's padding and concatenates the rest:

    tokens   = [ids_0 … ids_{k−1}, <pad> …]          [S + 1]  (ids_i = <bos> … <eos> of sample i)
    loss_mask: sample i's mask moved to its offset    [S]      (0 where the next sample starts)
    segment_ids[p] = i for inputs of sample i, −1 on padding      [S]
    position_ids[p] = p − start_i (restart at 0 per sample; a padding run counts from 0 too) [S]
    images   = the k images in sample order           [k, 3, H, W]
plus each sample's per-sample entries (template, index, texts, caption tokens …) as lists of k.

The model reads tokens[:-1] and predicts tokens[1:], so sample i occupies inputs
[start_i, start_i + L_i): its last input is its <eos>, whose target is the next sample's <bos>
(mask 0, as a padded sample's <eos> predicts <pad>). A pack of samples of L_0 … L_{k−1} tokens
therefore fits iff Σ L_i ≤ S + 1 — the same rule as one unpacked sample (L ≤ S + 1).

Attention and positions follow `segment_ids` / `position_ids` in the model
(megamoe.blocks.packed); this module is data only.

Legend: S model.seq_length, L tokens of one sample (with <bos> and <eos>), k samples in a pack.
"""

from __future__ import annotations

import numpy as np

from megamoe.data.word_tokenizer import WordTokenizer

PAD_ID, EOS_ID = WordTokenizer.pad_id, WordTokenizer.eos_id
# entries of a sample that are one value per sample (kept as lists of k in a pack)
PER_SAMPLE = ("template", "index", "prompt_text", "answer_text", "caption_tokens",
              "caption_end")


def plan_packs(lengths: list[int], seq_length: int) -> list[list[int]]:
    """Greedy in order: sample j joins the current pack while the pack's tokens stay within
    seq_length + 1 (module docstring), else starts the next. Returns the samples' positions in
    `lengths`, pack by pack. A sample longer than seq_length + 1 is one error naming it."""
    packs: list[list[int]] = []
    used = seq_length + 2            # forces a new pack for the first sample
    for j, n in enumerate(lengths):
        assert n >= 1, (j, n)
        if n > seq_length + 1:
            raise ValueError(f"packing: sample {j} has {n} tokens, more than model.seq_length + "
                             f"1 = {seq_length + 1}")
        if used + n > seq_length + 1:
            packs.append([])
            used = 0
        packs[-1].append(j)
        used += n
    return packs


def sample_length(sample: dict, name=None) -> int:
    """Tokens of a sample up to and including its first <eos> (one error naming the sample
    when it has none)."""
    tokens = np.asarray(sample["tokens"])
    eos = np.flatnonzero(tokens == EOS_ID)
    if not len(eos):
        raise ValueError(f"packing: sample {sample.get('index', name)} has no <eos> token")
    return int(eos[0]) + 1


def pack_samples(samples: list[dict], seq_length: int) -> dict:
    """One packed sequence of `samples`, in order (module docstring); an error naming the
    sample whose tokens overflow seq_length + 1."""
    assert samples, "packing: no samples"
    S = seq_length
    tokens_S1 = np.full(S + 1, PAD_ID, np.int64)
    loss_mask_S = np.zeros(S, np.float32)
    segment_ids_S = np.full(S, -1, np.int64)
    position_ids_S = np.zeros(S, np.int64)
    start = 0
    for i, sample in enumerate(samples):
        L = sample_length(sample, i)
        if start + L > S + 1:
            raise ValueError(f"packing: sample {sample.get('index', i)} ({L} tokens) does not "
                             f"fit after {start} tokens of {i} samples: a pack holds "
                             f"model.seq_length + 1 = {S + 1} tokens")
        tokens_S1[start:start + L] = np.asarray(sample["tokens"])[:L]
        mask = np.asarray(sample["loss_mask"])
        assert not mask[L - 1:].any(), "the loss mask reaches past the sample's <eos>"
        inputs = min(L, S - start)          # the last sample's <eos> may sit at S (no input)
        loss_mask_S[start:start + inputs] = mask[:inputs]
        segment_ids_S[start:start + inputs] = i
        position_ids_S[start:start + inputs] = np.arange(inputs)
        start += L
    position_ids_S[start:] = np.arange(max(S - start, 0))
    out = {"tokens": tokens_S1, "loss_mask": loss_mask_S, "segment_ids": segment_ids_S,
           "position_ids": position_ids_S,
           "images": np.stack([np.asarray(s["image"]) for s in samples])}
    for key in PER_SAMPLE:
        if key in samples[0]:
            out[key] = [s[key] for s in samples]
    return out


def split_batch(batch: dict) -> list[dict]:
    """The per-sample dicts (as `ScenesDataset.__getitem__` returns them) of a stacked batch
    (`ScenesDataset.get_batch`: "images" [B, …] and arrays or lists of B)."""
    B = len(batch["tokens"])
    out = []
    for b in range(B):
        sample = {("image" if key == "images" else key): value[b]
                  for key, value in batch.items()}
        out.append(sample)
    return out


def pack_fixed(batch: dict, seq_length: int, k: int) -> list[dict]:
    """The generated set's packing (data.pack_samples): each k consecutive samples of a stacked
    batch of B samples (B a multiple of k) become one packed sequence, so a micro-batch's
    sequences are a function of its samples alone (megamoe.data.loader's order rule)."""
    samples = split_batch(batch)
    assert len(samples) % k == 0, (len(samples), k)
    return [pack_samples(samples[i:i + k], seq_length) for i in range(0, len(samples), k)]
