"""Parameter-sharing maps of Mixture-of-Recursions (papers.md §1.2, with its examples)."""

import pytest

from megamoe.mor.sharing import pool_index, sharing_plan


def test_cycle_and_sequence_l9_nr3_as_in_papers_md():
    assert sharing_plan("cycle", 9, 3).pool_index == (0, 1, 2, 0, 1, 2, 0, 1, 2)
    assert sharing_plan("sequence", 9, 3).pool_index == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert sharing_plan("cycle", 9, 3).recursion_steps() == [(0, 1, 2)] * 3
    assert sharing_plan("sequence", 9, 3).recursion_steps() == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]


def test_middle_cycle_keeps_first_and_last_unique():
    # L = 1 + 3·3 + 1 = 11: K = 3; unrolled 1 + i + r·K is tied to 1 + i (official code)
    plan = sharing_plan("middle_cycle", 11, 3)
    assert plan.base_depth == 3
    assert plan.pool_index == (0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4)
    assert plan.pool_size == 5 and plan.first_unique == 0 and plan.last_unique == 4
    assert plan.recursion_steps() == [(1, 2, 3)] * 3
    for r in range(3):
        for i in range(3):
            assert pool_index("middle_cycle", 1 + i + r * 3, 11, 3) == 1 + i


def test_middle_sequence():
    plan = sharing_plan("middle_sequence", 11, 3)
    assert plan.pool_index == (0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4)
    assert plan.recursion_steps() == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]


def test_paper_model_sizes_unique_layers():
    # 360M: N_r = 2 → 1+15+1 = 17 unique layers, N_r = 3 → 12, N_r = 4 → 10 (papers.md §1.2)
    for L, nr, unique in [(32, 2, 17), (32, 3, 12), (34, 4, 10)]:
        assert sharing_plan("middle_cycle", L, nr).pool_size == unique


@pytest.mark.parametrize("strategy,L,nr", [("cycle", 10, 3), ("middle_cycle", 32, 4),
                                           ("middle_sequence", 3, 2), ("bogus", 9, 3)])
def test_layers_that_do_not_split_are_refused_naming_the_fields(strategy, L, nr):
    with pytest.raises(ValueError, match="model.(num_layers|mor.sharing)"):
        sharing_plan(strategy, L, nr)
