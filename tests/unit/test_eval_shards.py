"""`megamoe eval` on shards (megamoe.commands.eval_shards): the image-blind chance is a
leave-one-out majority per question, computed by hand here; samples are split out of packed rows;
the neighbour control rolls images within a micro-batch."""

import pytest
import torch

from megamoe.commands.eval_shards import (NeighbourInBatch, _samples,
                                          leave_one_out_majority)


def test_leave_one_out_majority_by_hand():
    pairs = [("a", "x"), ("a", "x"), ("a", "y"), ("b", "z")]
    # (a,x): the others of a are x, y -> tie, x seen first -> right; twice. (a,y): the others
    # are x, x -> wrong. (b,z): no other b -> wrong. Counting a sample's own answer (the
    # control) would also make (b,z) right: 0.75
    assert leave_one_out_majority(pairs) == 0.5
    assert leave_one_out_majority([]) == 0.0


def _batch(segments=None):
    tokens = torch.tensor([[1, 5, 6, 7, 8, 1, 5, 9, 3]])
    labels = torch.tensor([[5, 6, 7, 8, 1, 5, 9, 3, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.float)
    b = {"tokens": tokens, "labels": labels, "loss_mask": mask,
         "images": torch.arange(2 * 3).reshape(2, 3, 1, 1).float()}
    if segments is not None:
        b["segment_ids"] = torch.tensor([segments])
        b["is_caption"] = torch.tensor([False, True])
    else:
        b["is_caption"] = torch.tensor([False])
    return b


def test_samples_of_unpacked_and_packed_rows():
    # unpacked: one sample; its question is the tokens up to the first answer position (1)
    b = _batch()
    b["loss_mask"][0, 5:] = 0
    assert list(_samples(b)) == [((1, 5), (6, 7), False)]
    packed = list(_samples(_batch([0, 0, 0, 0, 0, 1, 1, 1, 1])))
    assert packed == [((1, 5), (6, 7), False), ((1, 5), (9, 3), True)]


def test_neighbour_images_roll_within_the_micro_batch():
    class One:
        def peek(self, consumed):
            return [_batch([0, 0, 0, 0, 0, 1, 1, 1, 1])]

    got = NeighbourInBatch(One()).peek(0)[0]["images"]
    assert torch.equal(got[0], _batch()["images"][1]) and torch.equal(got[1], _batch()["images"][0])

    class Single:
        def peek(self, consumed):
            b = _batch()
            return [dict(b, images=b["images"][:1])]

    with pytest.raises(ValueError, match="^train.micro_batch_size: "):
        NeighbourInBatch(Single()).peek(0)
