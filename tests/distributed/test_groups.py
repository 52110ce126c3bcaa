"""megamoe.parallel's groups: the "lm" grid holds the groups Megatron builds for the layout (and
the ranks a hand-worked layout predicts), with the sizes `ParallelDims` derives; re-initialising
Megatron's groups in one process reuses them instead of leaking sockets and threads (the pooled
test workers re-initialise for every test)."""

import os

import pytest

from megamoe.testing.pool import run_distributed


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))     # gloo's threads are not Python's


def _reinit(times: int) -> tuple:
    from megatron.core import parallel_state

    from megamoe.parallel import ParallelDims, destroy_groups, init_groups

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


# Hand-worked layouts of 4 ranks (Megatron's rank order: TP fastest, then CP, EP|DP, PP):
# grid field → the rank groups that tile the 4 ranks.
TP2_EP2 = (dict(tensor=2, expert=2, expert_tensor=1), {
    "tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]],
    "ep": [[0, 1], [2, 3]], "expt_tp": [[0], [1], [2], [3]], "expt_dp": [[0, 2], [1, 3]],
    "tp_dp_cp": [[0, 1, 2, 3]], "mp": [[0, 1], [2, 3]],
})
PP2_DP2 = (dict(pipeline=2), {
    "tp": [[0], [1], [2], [3]], "dp": [[0, 1], [2, 3]], "pp": [[0, 2], [1, 3]],
    "ep": [[0], [1], [2], [3]], "expt_tp": [[0], [1], [2], [3]], "expt_dp": [[0, 1], [2, 3]],
    "tp_dp_cp": [[0, 1], [2, 3]], "mp": [[0, 2], [1, 3]],
})


def _grid(layout: dict) -> dict:
    """This rank's view of the "lm" grid: each field's ranks, the same group fetched from
    Megatron's global state, and sizes against ParallelDims."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megamoe.parallel import ParallelDims, build_grids

    dims = ParallelDims(world_size=dist.get_world_size(), **layout)
    grids = build_grids(dims)
    pg = grids.lm
    megatron = {"tp": ps.get_tensor_model_parallel_group(),
                "pp": ps.get_pipeline_model_parallel_group(),
                "dp": ps.get_data_parallel_group(), "ep": ps.get_expert_model_parallel_group(),
                "expt_tp": ps.get_expert_tensor_parallel_group(),
                "expt_dp": ps.get_expert_data_parallel_group(),
                "tp_dp_cp": ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
                "mp": ps.get_model_parallel_group()}
    ranks = {name: dist.get_process_group_ranks(getattr(pg, name)) for name in megatron}
    theirs = {name: dist.get_process_group_ranks(g) for name, g in megatron.items()}
    sizes = {"dp": (pg.dp.size(), dims.data), "expt_dp": (pg.expt_dp.size(), dims.expert_data),
             "expt_tp": (pg.expt_tp.size(), dims.expert_tensor_size),
             "pp": (pg.pp.size(), dims.pipeline), "tp": (pg.tp.size(), dims.tensor)}
    return {"rank": dist.get_rank(), "ranks": ranks, "megatron": theirs, "sizes": sizes,
            "names": list(grids), "dims": grids.dims["lm"] == dims}


def _mismatches(views: list, expected: dict) -> list:
    out = []
    for view in views:
        for name, groups in expected.items():
            want = next(g for g in groups if view["rank"] in g)
            if view["ranks"][name] != want:
                out.append(f"rank {view['rank']} {name}: {view['ranks'][name]} != {want}")
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [TP2_EP2, PP2_DP2], ids=["TP2-EP2", "PP2-DP2"])
def test_lm_grid_holds_megatrons_groups(layout):
    degrees, expected = layout
    views = run_distributed(_grid, 4, degrees)
    assert not _mismatches(views, expected)
    other = PP2_DP2 if layout is TP2_EP2 else TP2_EP2
    assert _mismatches(views, other[1]), "the check cannot tell two layouts apart"
    for view in views:
        assert view["ranks"] == view["megatron"]
        assert all(got == want for got, want in view["sizes"].values()), view["sizes"]
        assert view["names"] == ["lm"] and view["dims"]
