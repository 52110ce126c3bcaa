"""FP8 experts across layouts.

EP2 = one process: the single process sees each micro-batch alone while under EP2 an expert
sees both DP ranks' tokens at once, so per-expert tensor scales (tensorwise) and the token-wise
quantisation of the weight gradient (every recipe) group different tokens: the results differ
by FP8 rounding, not more. Stated tolerance: loss ≤ 2e-5 relative per step; each gradient
tensor ≤ 4u · max|g| (u = 1/16, E4M3's unit roundoff: other roundings of the same values,
carried back through the network); parameters after 3 SGD steps (lr 0.1) ≤ 1e-4. Measured
(2 cores): loss ≤ 3e-6; gradients ≤ 0.10 · max|g| tensorwise, 0.03 rowwise; parameters
≤ 2e-5.
The negative control (one expert perturbed on one rank) gives gradients 0.46 · max|g| and
parameters 3.5e-2 apart.

EP2 × expert-DP2 (4 ranks): the replicas of each expert hold identical amax histories although
their own tokens' amaxes differ (the all-reduce, not the data, makes them equal); the history is
saved per global expert and loads into one process (EP2 → EP1) unchanged.
"""

import pytest
import torch
import torch.distributed as dist

from megamoe.fp8 import E4M3
from megamoe.testing.parity import parity_task, reference
from megamoe.testing.pool import run_distributed

LOSS_RTOL = 2e-5
GRAD_RTOL = 4 * E4M3.unit_roundoff
PARAM_ATOL = 1e-4


def fp8_compare(ref, got) -> list:
    bad = [f"loss step {i + 1}: {a} vs {b}" for i, (a, b) in enumerate(zip(ref.losses, got.losses))
           if abs(a - b) > LOSS_RTOL * abs(a)]
    if set(ref.grads) != set(got.grads):
        bad.append("gradient keys")
    for k in sorted(set(ref.grads) & set(got.grads)):
        err = (ref.grads[k] - got.grads[k]).abs().max().item()
        if err > GRAD_RTOL * ref.grads[k].abs().max().item() + 1e-8:
            bad.append(f"grad {k}: {err:.2e}")
    bad += [f"param {k}" for k in ref.params
            if (ref.params[k] - got.params[k]).abs().max().item() > PARAM_ATOL]
    return bad


@pytest.mark.timeout(600)
@pytest.mark.parametrize("overrides", [["model.moe.fp8.recipe=tensorwise"],
                                       ["model.moe.fp8.recipe=rowwise",
                                        "model.moe.experts=grouped",
                                        "model.moe.capacity_factor=1.0"]],
                         ids=["tensorwise_dropless", "rowwise_grouped_capacity"])
def test_fp8_ep2_matches_one_process(overrides):
    ref = reference(overrides, dp=2)
    got = run_distributed(parity_task, 2, overrides + ["parallel.expert=2"])[0]
    problems = fp8_compare(ref, got)
    assert not problems, "\n".join(problems[:20])
    if "model.moe.capacity_factor=1.0" not in overrides:     # one negative control suffices
        bad = run_distributed(parity_task, 2, overrides + ["parallel.expert=2"], perturb=True)[0]
        assert fp8_compare(ref, bad), "the perturbed expert went unnoticed"


DELAYED = ["model.moe.fp8.recipe=delayed", "model.moe.fp8.amax_history_len=4"]


def _histories(engine):
    """(ep rank, expert-DP rank, {layer: history}, {layer: last local amaxes}) of this rank."""
    from megamoe.models.lm.model import moe_layers

    layers = moe_layers(engine.modules)
    ex = layers[0].experts
    return (ex.ep_group.rank(), ex.dp_group.rank(),
            {m.layer_number: m.experts.fp8_state.amax_history.clone() for m in layers},
            {m.layer_number: m.experts.fp8_state.last_local_amax for m in layers})


def replicas_task(overrides, root: str):
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.testing.checkpointing import _engine, _steps

    engine = _engine(overrides)
    _steps(engine, 0, 2)
    save_checkpoint(root, engine, {})
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, _histories(engine))
    return every if dist.get_rank() == 0 else None


def load_task(overrides, root: str):
    from megamoe.checkpoint.load import load_checkpoint, resolve
    from megamoe.testing.checkpointing import _engine

    engine = _engine(overrides)
    before = _histories(engine)[2]
    load_checkpoint(engine, resolve(root, log=lambda *_: None))
    return before, _histories(engine)[2]


@pytest.mark.timeout(600)
def test_fp8_replica_scales_identical_and_resharded(tmp_path):
    root = str(tmp_path / "ckpt")
    ranks = run_distributed(replicas_task, 4, DELAYED + ["parallel.expert=2"], root)[0]
    by_ep = {}
    for ep, edp, hist, local in ranks:
        by_ep.setdefault(ep, []).append((edp, hist, local))
    assert sorted(by_ep) == [0, 1] and all(len(v) == 2 for v in by_ep.values())
    for ep, ((_, h0, l0), (_, h1, l1)) in by_ep.items():
        for layer in h0:
            assert (h0[layer][:, :, :, :2] > 0).all()           # two steps recorded
            assert torch.equal(h0[layer], h1[layer]), (ep, layer)
        # negative control: the replicas' own amaxes differ; only the all-reduce equalises them
        assert any(not torch.equal(l0[layer], l1[layer]) for layer in l0)
    before, after = run_distributed(load_task, 1, DELAYED, root)[0]
    for layer in after:
        saved = torch.cat([by_ep[0][0][1][layer], by_ep[1][0][1][layer]])   # EP2 → global
        assert torch.equal(after[layer], saved), layer
        assert not torch.equal(before[layer], saved)             # loading changed the state
