"""Causality probe (DESIGN.md): perturb the tokens after position t and check the outputs up to t
are unchanged. Every router family's declaration (`causal_for`) is checked against the probe;
families declared non-causal are refused in a causal decoder without the opt-in.

- top-k: dropless is causal; capacity dropping competes across the micro-batch.
- expert-choice, Expert Race and DiffMoE choose across the micro-batch / data-parallel group
  when training; Race's evaluation rule (S ≥ τ_ema) looks at one token at a time and passes the
  probe, expert-choice selects the same way in evaluation and fails it there too (DiffMoE's
  evaluation rule σ(p) > τ is per token too; the vit-level test checks it with τ set).
- MoEE, DiT-MoE and Diff-MoE gate per token (Diff-MoE's synthetic timestep depends only on the
  first token); Soft MoE's slots mix the positions of each sequence.

Batch independence (a sample alone gives its in-batch outputs): Soft MoE's per-sequence slots
pass, in training and evaluation; V-MoE's eval capacity and expert choice (micro-batch groups)
fail, as they must.
- dropless V-MoE/LIMoE and modality routing decide per token (in training mode too, with the
  routing noise on); V-MoE/LIMoE with capacity and batch priority choose across the micro-batch.
"""

import pytest

from megamoe.testing.causality import batch_probe_task, probe_task
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

NO_AUX = ["model.moe.z_loss_coeff=0", "model.moe.aux_loss_coeff=0"]
EXPERT_CHOICE = NO_AUX + ["model.moe.router=expert_choice"]
RACE = NO_AUX + ["model.moe.router=race", "model.moe.race.similarity_loss_coeff=0.01"]
DIFFMOE = NO_AUX + ["model.moe.router=diffmoe"]
NO_Z = ["model.moe.z_loss_coeff=0"]
VMOE = NO_Z + ["model.moe.router=vmoe"]
LIMOE = NO_Z + ["model.moe.router=limoe", "data.synthetic_modalities=2"]
CAPACITY = ["model.moe.vmoe.capacity_ratio=0.5", "model.moe.vmoe.priority=max"]

# (id, overrides, declared causal, probe in training mode, passes the probe)
FAMILIES = [
    ("topk_dropless", [], True, False, True),
    ("topk_sigmoid_raw_lossfree", ["model.moe.score_function=sigmoid",
                                   "model.moe.renormalize=false",
                                   "model.moe.loss_free_bias_rate=0.01"], True, False, True),
    ("topk_capacity", ["model.moe.capacity_factor=0.5"], False, False, False),
    ("topk_capacity_position", ["model.moe.capacity_factor=0.5",
                                "model.moe.drop_policy=position"], False, False, False),
    ("expert_choice-train", EXPERT_CHOICE, False, True, False),
    ("expert_choice-eval", EXPERT_CHOICE, False, False, False),
    ("race-train", RACE, False, True, False),
    ("race-eval-ema", RACE, False, False, True),
    ("diffmoe-train", DIFFMOE, False, True, False),
    ("moee", ["model.moe.router=moee", "model.moe.topk=4"], True, False, True),
    ("dit_moe", ["model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=64"],
     True, False, True),
    ("soft", ["model.moe.router=soft"], False, False, False),
    ("diff_moe", ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8",
                  "data.synthetic_timesteps=true"], True, False, True),
    ("vmoe_dropless_train", VMOE + ["model.moe.vmoe.capacity_ratio=null"], True, True, True),
    ("vmoe_capacity_bpr", VMOE + CAPACITY, False, False, False),
    ("vmoe_capacity_bpr_train", VMOE + CAPACITY, False, True, False),
    ("vmoe_eval_capacity", VMOE + ["model.moe.vmoe.capacity_ratio=null",
                                   "model.moe.vmoe.eval_capacity_ratio=0.5"], False, False, False),
    ("limoe_dropless_train", LIMOE + ["model.moe.vmoe.capacity_ratio=null"], True, True, True),
    ("limoe_capacity", LIMOE + CAPACITY, False, False, False),
    ("modality_vlmo", NO_Z + ["model.moe.router=modality", "data.synthetic_modalities=3",
                              "model.moe.modality.num_modalities=3",
                              "model.moe.modality.vl_ffn_layers=1"], True, False, True),
    ("modality_pools", NO_Z + ["model.moe.router=modality", "data.synthetic_modalities=2",
                               "model.moe.modality.mode=pools"], True, True, True),
]
NON_CAUSAL = {f[0].split("-")[0]: f[1] for f in FAMILIES if not f[2]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,overrides,declared,train_mode,passes", FAMILIES,
                         ids=[f[0] for f in FAMILIES])
def test_causality_probe_matches_the_declaration(name, overrides, declared, train_mode, passes):
    from megamoe.moe.routers import ROUTERS

    opted_in = overrides + ["model.moe.allow_non_causal=true"]
    cfg = tiny_config(opted_in)
    assert ROUTERS[cfg.model.moe.router].causal_for(cfg.model.moe) == declared
    prefix_diff, total_diff = run_distributed(probe_task, 1, opted_in, train_mode=train_mode)[0]
    assert total_diff > 1e-3          # the perturbation reaches later positions
    if passes:
        assert prefix_diff < 1e-6
    else:
        assert prefix_diff > 1e-6


# (id, overrides, probe in training mode, batch-independent)
BATCH_PROBES = [
    ("soft", ["model.moe.router=soft"], False, True),
    ("soft-train", ["model.moe.router=soft"], True, True),
    ("vmoe_eval_capacity", VMOE + ["model.moe.vmoe.capacity_ratio=null",
                                   "model.moe.vmoe.eval_capacity_ratio=0.5"], False, False),
    ("expert_choice-eval", EXPERT_CHOICE, False, False),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,overrides,train_mode,independent", BATCH_PROBES,
                         ids=[f[0] for f in BATCH_PROBES])
def test_batch_independence_probe(name, overrides, train_mode, independent):
    diff, scale = run_distributed(batch_probe_task, 1,
                                  overrides + ["model.moe.allow_non_causal=true"],
                                  train_mode=train_mode)[0]
    assert scale > 0.1
    if independent:
        assert diff < 1e-5 * scale
    else:
        assert diff > 1e-3 * scale


@pytest.mark.parametrize("name", sorted(NON_CAUSAL))
def test_non_causal_family_is_refused_without_opt_in(name):
    from megamoe.moe.routers import check_router_causality

    overrides = NON_CAUSAL[name]
    with pytest.raises(ValueError, match="model.moe.router.*allow_non_causal"):
        check_router_causality(tiny_config(overrides))
    check_router_causality(tiny_config(overrides + ["model.moe.allow_non_causal=true"]))


@pytest.mark.parametrize("router", ["expert_choice", "race", "diffmoe"])
@pytest.mark.parametrize("field,value", [("capacity_factor", "1.0"), ("z_loss_coeff", "0.001")])
def test_token_choice_options_are_refused(router, field, value):
    from megamoe.config import ConfigError

    with pytest.raises(ConfigError, match=f"model.moe.{field}"):
        tiny_config(NO_AUX + [f"model.moe.router={router}", f"model.moe.{field}={value}"])


def test_missing_modality_ids_give_a_clear_error():
    with pytest.raises(Exception, match="needs routing context 'modality_ids_BS'"):
        run_distributed(probe_task, 1, NO_Z + ["model.moe.router=modality"])
