"""Modality experts (VLMo with a VL expert in the top layers; Uni-MoE pools) with synthetic
modality ids under EP2 and EP2×TP2 with sequence parallelism (each rank routes its sequence
shard's ids): the same loss, gradients and parameters as the single-process reference;
perturbing one expert on one rank must break it."""

import pytest

from megamoe.testing.parity import compare, parity_task
from megamoe.testing.pool import run_distributed

EP2 = (2, ["parallel.expert=2"], 2)
EP2_TP2 = (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"], 1)

BASE = ["model.moe.router=modality", "model.moe.z_loss_coeff=0"]
VLMO = BASE + ["data.synthetic_modalities=3", "model.moe.modality.num_modalities=3",
               "model.moe.modality.vl_ffn_layers=2"]
POOLS = BASE + ["data.synthetic_modalities=2", "model.moe.modality.mode=pools",
                "model.moe.num_experts=6", "model.moe.modality.pool_sizes=[2,4]"]
CASES = [("vlmo", VLMO, EP2), ("vlmo", VLMO, EP2_TP2), ("pools", POOLS, EP2),
         ("pools", POOLS, EP2_TP2)]
_REFERENCES = {}


def reference(dp: int, overrides: list):
    key = (dp, tuple(overrides))
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(parity_task, 1, overrides, reference_dp=dp)[0]
    return _REFERENCES[key]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout", CASES,
                         ids=[f"{c[0]}-w{c[2][0]}" for c in CASES])
def test_modality_matches_single_process(name, overrides, layout):
    world, parallel, dp = layout
    ref = reference(dp, overrides)
    got = run_distributed(parity_task, world, overrides + parallel)[0]
    problems = compare(ref, got)
    assert not problems, "\n".join(problems[:20])
    bad = run_distributed(parity_task, world, overrides + parallel, perturb=True)[0]
    assert compare(ref, bad), "perturbed expert went unnoticed"
