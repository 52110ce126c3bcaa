"""Modality experts (VLMo with a VL expert in the top layers; Uni-MoE pools) with synthetic
modality ids under EP2 and EP2×TP2 with sequence parallelism (each rank routes its sequence
shard's ids): the same loss, gradients and parameters as the single-process reference;
perturbing one expert on one rank must break it."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, check_layout, reference


BASE = ["model.moe.router=modality", "model.moe.z_loss_coeff=0"]
VLMO = BASE + ["data.synthetic_modalities=3", "model.moe.modality.num_modalities=3",
               "model.moe.modality.vl_ffn_layers=2"]
POOLS = BASE + ["data.synthetic_modalities=2", "model.moe.modality.mode=pools",
                "model.moe.num_experts=6", "model.moe.modality.pool_sizes=[2,4]"]
CASES = [("vlmo", VLMO, EP2), ("vlmo", VLMO, EP2_TP2), ("pools", POOLS, EP2),
         ("pools", POOLS, EP2_TP2)]
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout", CASES,
                         ids=[f"{c[0]}-w{c[2][0]}" for c in CASES])
def test_modality_matches_single_process(name, overrides, layout):
    ref = reference(overrides, dp=layout[2])
    check_layout(overrides, layout, ref)
