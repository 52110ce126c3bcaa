"""ParallelDims: every derived size of a layout, and one clear error for a layout that does not
tile the ranks."""

import pytest

from megamoe.parallel import ParallelDims, build_grids, microbatches_per_step


def test_derived_sizes_of_a_folded_layout():
    # 16 ranks: attention TP2·PP2·DP4; experts ETP1·EP4·EDP2 over the same ranks and stages
    d = ParallelDims(world_size=16, tensor=2, pipeline=2, virtual_pipeline=3, expert=4,
                     expert_tensor=1)
    assert (d.data, d.expert_tensor_size, d.expert_data) == (4, 1, 2)
    assert (d.model_chunks, d.virtual_stages) == (3, 6)
    assert d.sequence_parallel                          # unset: on with TP > 1
    assert d.num_microbatches(64, 2) == 8               # 64 / (2 · 4)
    assert d.describe() == "TP2·PP2·DP4·EP4·ETP1·VP3·SP"


def test_defaults_and_sequence_parallel_resolution():
    d = ParallelDims(world_size=4, expert=2)
    assert (d.data, d.expert_tensor_size, d.expert_data) == (4, 1, 2)
    assert (d.model_chunks, d.virtual_stages) == (1, 1)
    assert not d.sequence_parallel
    assert not ParallelDims(world_size=2, sequence_parallel=True).sequence_parallel   # no TP
    assert not ParallelDims(world_size=2, tensor=2, sequence_parallel=False).sequence_parallel
    # expert-TP defaults to TP: TP2·EP2 on 4 ranks leaves expert-DP 1
    assert ParallelDims(world_size=4, tensor=2, expert=2).expert_data == 1


def test_from_config_matches_the_config_sizes():
    from megamoe.config import load_config, num_microbatches

    cfg = load_config(None, ["parallel.world_size=8", "parallel.tensor=2", "parallel.expert=2",
                             "parallel.expert_tensor=1", "model.moe.num_experts=4",
                             "train.global_batch_size=16", "train.micro_batch_size=2"])
    d, p = ParallelDims.from_config(cfg.parallel), cfg.parallel
    assert (d.data, d.expert_data, d.expert_tensor_size) == (p.data, p.expert_data,
                                                             p.expert_tensor_size)
    assert d.num_microbatches(16, 2) == num_microbatches(cfg) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, tensor=4),
     "parallel.world_size: 6 is not divisible by tensor × pipeline = 4"),
    (dict(world_size=4, tensor=2, expert=4),
     "parallel.world_size: 4 is not divisible by expert_tensor × expert × pipeline = 8"),
    (dict(world_size=2, pipeline=0), "parallel.pipeline: 0 must be >= 1"),
])
def test_a_layout_that_does_not_tile_the_ranks_is_one_error(kwargs, message):
    with pytest.raises(ValueError) as e:
        ParallelDims(**kwargs)
    assert str(e.value) == message


def test_microbatches_need_a_whole_number():
    assert microbatches_per_step(16, 4, 2) == 2
    with pytest.raises(ValueError, match="train.global_batch_size: 12 is not a multiple of "
                                         "micro_batch_size × data-parallel size = 4 × 2"):
        microbatches_per_step(12, 4, 2)


def test_an_unknown_grid_is_refused_before_any_group_is_built():
    with pytest.raises(ValueError, match=r"grids: unknown \[.audio.\]; known: lm, vision"):
        build_grids({"lm": ParallelDims(world_size=1), "audio": ParallelDims(world_size=1)})
