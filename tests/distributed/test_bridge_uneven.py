"""The CPU bridge's all-gather and reduce-scatter with uneven rows per rank (the MoE dispatcher's
gather over expert-TP once pads routed nowhere or dropped tokens make the ranks' counts differ):
gloo takes equal sizes only, so Megatron's own versions fail there (the control); the bridge's
equal a hand-computed gather and its backward."""

import pytest
import torch

from megamoe.testing.pool import run_distributed

SIZES = [3, 1]     # rows on rank 0 and rank 1


def _uneven(use_megatron: bool):
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from megamoe.platform import bridge

    group, rank = dist.new_group([0, 1]), dist.get_rank()
    rows = torch.arange(SIZES[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 10 * rank
    gather, reduce_scatter = mappings._gather_along_first_dim, \
        mappings._reduce_scatter_along_first_dim
    if use_megatron:
        gather = bridge._REPLACED[bridge._MAPPINGS, "_gather_along_first_dim"]
        reduce_scatter = bridge._REPLACED[bridge._MAPPINGS, "_reduce_scatter_along_first_dim"]
    try:
        gathered = gather(rows, group, output_split_sizes=SIZES)
        grads = torch.full((sum(SIZES), 2), float(rank + 1))
        grads[rank] += 100          # a row only this rank's gradient touches
        mine = reduce_scatter(grads, group, input_split_sizes=SIZES)
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"
    return gathered, mine


def test_uneven_gather_and_its_backward_on_gloo():
    results = run_distributed(_uneven, 2, False)
    want = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(2.0).reshape(1, 2) + 10])
    for rank, (gathered, mine) in enumerate(results):
        assert torch.equal(gathered, want)
        summed = torch.full((4, 2), 3.0)
        summed[0] += 100
        summed[1] += 100
        start = sum(SIZES[:rank])
        assert torch.equal(mine, summed[start:start + SIZES[rank]]), (rank, mine)


def test_megatrons_own_uneven_gather_fails_on_gloo():
    """The control: the reason for the patch."""
    for out in run_distributed(_uneven, 2, True):
        assert isinstance(out, str) and out.startswith("RuntimeError"), out
