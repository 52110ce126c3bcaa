"""Vocabulary padding, as Megatron-LM pads: the embedding and the output layer get
`padded_vocab_size` rows, the smallest multiple of `model.make_vocab_size_divisible_by` × TP that
holds the vocabulary, so that tensor parallelism splits them evenly (a 731-piece tokenizer
under TP2 trains with 768 rows).

Megatron-LM lets the padded logits into the softmax (they learn to be very negative). megamoe
masks them to -inf at the output layer instead (`mask_padded_logits`): padded ids take no
probability mass, get no gradient, are never generated, and every loss and metric equals the
unpadded model's with the same weights, under any TP.

The padded size is a function of TP, so a checkpoint may be resumed under a different padding:
Megatron's sharded state dict marks both tensors `allow_shape_mismatch` (megamoe's optimizer
state inherits the flag), so loading reads the rows both layouts have and zeroes the rest;
`meta.json` records the unpadded and padded sizes. The model's global view (`gather_global`,
`init_global`, `load_global_into`, and through them parity tests and the Hugging Face export) is
the unpadded model: padding is a detail of one layout, like a TP split.

Shapes: S sequence, B batch, V (padded) vocabulary, this rank's shard of it under TP.
"""

from __future__ import annotations

import torch

# checkpoint keys of the tensors with one row per vocabulary id (padded)
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def padded_vocab_size(vocab: int, divisible_by: int, tensor_parallel: int) -> int:
    """The smallest multiple of divisible_by × tensor_parallel that is >= vocab."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab // multiple) * multiple


def describe_vocab(vocab: int, padded: int, divisible_by: int, tensor_parallel: int) -> str:
    """The start-up line's value, e.g. "731 (padded to 768 for TP2: make_vocab_size_divisible_by
    128 × TP 2)"."""
    if padded == vocab:
        return str(vocab)
    return (f"{vocab} (padded to {padded} for TP{tensor_parallel}: make_vocab_size_divisible_by "
            f"{divisible_by} × TP {tensor_parallel}; padded ids are masked out of the softmax)")


def mask_padded_logits(model, vocab: int, tp_rank: int) -> None:
    """Set the logits of padded ids to -inf wherever `model.output_layer` computes them (its
    output is this TP rank's vocabulary shard, or all of it when gathered)."""
    padded = model.vocab_size

    def hook(module, args, output):
        logits_SBV, bias = output
        v = logits_SBV.shape[-1]
        start = 0 if v == padded else tp_rank * v
        if start + v <= vocab:
            return None
        padded_V = torch.arange(start, start + v, device=logits_SBV.device) >= vocab
        # in place: no second copy of the logits (the linear's backward does not read them)
        return logits_SBV.masked_fill_(padded_V, float("-inf")), bias

    if padded > vocab:
        model.output_layer.register_forward_hook(hook)


def unpadded_vocab_size(chunks) -> int | None:
    """The vocabulary of model chunks built by `build_lm` (None for other modules)."""
    return getattr(chunks[0], "unpadded_vocab_size", None) if chunks else None


def unpadded_rows(key: str, global_offset: tuple, local_rows: int,
                  vocab: int | None) -> int:
    """How many of a shard's `local_rows` (starting at global row `global_offset[0]`) are real
    vocabulary rows; all of them for tensors other than VOCAB_KEYS."""
    if vocab is None or key not in VOCAB_KEYS:
        return local_rows
    return max(0, min(local_rows, vocab - global_offset[0]))


def padding_elements(chunks) -> int:
    """Elements in the padded rows of this rank's vocabulary parameters: not parameters of the
    model (parameter counts, like the HF export, leave them out)."""
    vocab, total = unpadded_vocab_size(chunks), 0
    for chunk in chunks if vocab is not None else []:
        tp_rank = chunk.pg_collection.tp.rank()
        for key, p in chunk.named_parameters():
            if key in VOCAB_KEYS:
                rows = p.shape[0]
                total += (rows - unpadded_rows(key, (tp_rank * rows,), rows, vocab)) * p[0].numel()
    return total


def pad_rows(src: torch.Tensor, rows: int) -> torch.Tensor:
    """`src` with zero rows appended up to `rows` (an unpadded vocabulary tensor, e.g. from a
    Hugging Face folder, loaded into a padded model)."""
    extra = rows - src.shape[0]
    assert extra >= 0, (tuple(src.shape), rows)
    return torch.cat([src, src.new_zeros(extra, *src.shape[1:])]) if extra else src
