"""The resumable loader (megamoe.data.loader) and the engine-neutral checkpoint state
(megamoe.checkpoint.state): a loader restored from its state continues with the batches an
uninterrupted one would have given, on any DP size; checkpoints written before the loader state
existed (only `progress.consumed_samples`) restore the same state."""

import numpy as np
import pytest
import torch

from megamoe.checkpoint.state import CheckpointState
from megamoe.data.batches import collate_tokens
from megamoe.data.loader import DataLoader


class Ramp:
    """Sample i is [i, i+1, …, i+4]: every sample names its dataset index."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return np.arange(i, i + 5)


def loader(dp_rank=0, dp_size=1, consumed=0):
    return DataLoader(Ramp(), collate_tokens, global_batch_size=4, micro_batch_size=2,
                      dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed)


def step_indices(mbs):
    return [mb["tokens"][:, 0].tolist() for mb in mbs], [mb["sample_index"].tolist() for mb in mbs]


def test_restored_loader_continues_where_it_stopped_and_wraps_with_unique_sample_index():
    a = loader()
    for _ in range(2):
        a.step_batches()
    b = loader()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"consumed_samples": 8}
    for _ in range(3):
        assert step_indices(a.step_batches()) == step_indices(b.step_batches())
    # step 3 of a 10-sample dataset wraps: dataset indices repeat, sample indices do not
    idx, sample = step_indices(loader(consumed=8).step_batches())
    assert idx == [[8, 9], [0, 1]] and sample == [[8, 9], [10, 11]]


def test_the_data_order_does_not_depend_on_the_dp_size():
    one = step_indices(loader(consumed=4).step_batches())[1]
    two = [step_indices(loader(r, 2, consumed=4).step_batches())[1] for r in range(2)]
    # micro-batch m concatenated over the DP ranks is the one-rank step's positions
    assert sorted(sum(one, [])) == sorted(sum(sum(two, []), [])) == [4, 5, 6, 7]
    assert two[0][0] + two[1][0] == [4, 5, 6, 7]


def test_bad_loader_input_is_one_clear_error():
    with pytest.raises(ValueError, match=r"train.global_batch_size: 4 is not a multiple of "
                                         r"micro_batch_size × data-parallel size = 2 × 4"):
        loader(0, 4)
    with pytest.raises(ValueError, match="unknown entries \\['shard'\\]"):
        loader().load_state_dict({"consumed_samples": 0, "shard": 3})


def test_checkpoint_state_round_trip_and_the_pre_loader_format():
    state = CheckpointState(model={"model0": {"w": 1}, "model1": {"w": 2}},
                            progress={"step": 3, "consumed_samples": 12},
                            scheduler={"lr": 0.1}, data={"consumed_samples": 12})
    sd = state.sharded()
    assert set(sd) == {"model0", "model1", "scheduler", "progress"}   # the keys on disk
    back = CheckpointState.from_sharded(sd)
    assert back.model == state.model and back.data == state.data
    assert back.progress == state.progress and back.optimizer is None
    old = {"model": {"w": torch.zeros(1)}, "optimizer_state": {"x": 1},
           "progress": {"step": 5, "consumed_samples": 40}}        # written before the loader
    restored = CheckpointState.from_sharded(old)
    assert restored.data == {"consumed_samples": 40} and restored.optimizer == {"x": 1}
    assert restored.progress == {"step": 5, "consumed_samples": 40}
