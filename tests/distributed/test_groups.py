"""Re-initialising Megatron's groups in one process reuses them instead of leaking sockets and
threads (the pooled test workers re-initialise for every test)."""

import os

import pytest

from megamoe.testing.pool import run_distributed


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))     # gloo's threads are not Python's


def _reinit(times: int) -> tuple:
    from megatron.core import parallel_state

    from megamoe.parallel.groups import ParallelDims, destroy_groups, init_groups

    layouts = [ParallelDims(world_size=2, tensor=2), ParallelDims(world_size=2, expert=2)]
    for dims in layouts:                      # every distinct group exists once from here on
        destroy_groups()
        init_groups(dims)
    first = parallel_state.get_expert_model_parallel_group()
    threads = _threads()
    for i in range(times):
        destroy_groups()
        init_groups(layouts[i % 2])
    same = parallel_state.get_expert_model_parallel_group() is first
    grown = _threads() - threads
    destroy_groups()
    return same, grown


@pytest.mark.timeout(300)
def test_reinitialised_groups_are_reused():
    for same, grown in run_distributed(_reinit, 2, 6):
        assert same
        assert grown <= 0, f"{grown} threads more after re-initialising 6 times"
