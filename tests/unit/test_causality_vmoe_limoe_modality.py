"""Causality of V-MoE, LIMoE and the modality routers (DESIGN.md): dropless V-MoE/LIMoE and
modality routing decide per token and pass the probe (in training mode too, with the routing
noise on); V-MoE/LIMoE with capacity and batch priority choose across the micro-batch, fail the
probe and are refused without model.moe.allow_non_causal."""

import pytest

from megamoe.testing.causality import probe_task
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

NO_Z = ["model.moe.z_loss_coeff=0"]
VMOE = NO_Z + ["model.moe.router=vmoe"]
LIMOE = NO_Z + ["model.moe.router=limoe", "data.synthetic_modalities=2"]
CAPACITY = ["model.moe.vmoe.capacity_ratio=0.5", "model.moe.vmoe.priority=max"]

# (id, overrides, declared causal, probe in training mode)
FAMILIES = [
    ("vmoe_dropless_train", VMOE + ["model.moe.vmoe.capacity_ratio=null"], True, True),
    ("vmoe_capacity_bpr", VMOE + CAPACITY, False, False),
    ("vmoe_capacity_bpr_train", VMOE + CAPACITY, False, True),
    ("vmoe_eval_capacity", VMOE + ["model.moe.vmoe.capacity_ratio=null",
                                   "model.moe.vmoe.eval_capacity_ratio=0.5"], False, False),
    ("limoe_dropless_train", LIMOE + ["model.moe.vmoe.capacity_ratio=null"], True, True),
    ("limoe_capacity", LIMOE + CAPACITY, False, False),
    ("modality_vlmo", NO_Z + ["model.moe.router=modality", "data.synthetic_modalities=3",
                              "model.moe.modality.num_modalities=3",
                              "model.moe.modality.vl_ffn_layers=1"], True, False),
    ("modality_pools", NO_Z + ["model.moe.router=modality", "data.synthetic_modalities=2",
                               "model.moe.modality.mode=pools"], True, True),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,overrides,causal,train_mode", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_causality_probe_matches_the_declaration(name, overrides, causal, train_mode):
    from megamoe.moe.routers import ROUTERS

    opt_in = overrides + ["model.moe.allow_non_causal=true"]
    cfg = tiny_config(opt_in)
    assert ROUTERS[cfg.model.moe.router].causal_for(cfg.model.moe) == causal
    prefix_diff, total_diff = run_distributed(probe_task, 1, opt_in, train_mode=train_mode)[0]
    assert total_diff > 1e-3          # the perturbation reaches later positions
    if causal:
        assert prefix_diff < 1e-6
    else:
        assert prefix_diff > 1e-6


@pytest.mark.parametrize("name,overrides", [(f[0], f[1]) for f in FAMILIES if not f[2]],
                         ids=[f[0] for f in FAMILIES if not f[2]])
def test_non_causal_variant_is_refused_without_opt_in(name, overrides):
    from megamoe.moe.routers import check_router_causality

    with pytest.raises(ValueError, match="model.moe.router.*allow_non_causal"):
        check_router_causality(tiny_config(overrides))
    check_router_causality(tiny_config(overrides + ["model.moe.allow_non_causal=true"]))


def test_missing_modality_ids_give_a_clear_error():
    with pytest.raises(Exception, match="needs routing context 'modality_ids_BS'"):
        run_distributed(probe_task, 1, NO_Z + ["model.moe.router=modality"])
