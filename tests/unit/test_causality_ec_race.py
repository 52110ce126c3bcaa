"""Causality of expert-choice and Expert Race routing (DESIGN.md, Causality): both choose
tokens across the micro-batch (Race across the data-parallel group) when training, so
perturbing the tokens after position t changes the outputs up to t, and both are refused in the
causal decoder without model.moe.allow_non_causal=true. Race's evaluation rule (M = S ≥ τ_ema)
looks at one token at a time and passes the probe; expert choice selects the same way in
evaluation and fails it there too."""

import pytest

from megamoe.testing.causality import probe_task
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

BASE = ["model.moe.z_loss_coeff=0", "model.moe.aux_loss_coeff=0"]
EXPERT_CHOICE = BASE + ["model.moe.router=expert_choice"]
RACE = BASE + ["model.moe.router=race", "model.moe.race.similarity_loss_coeff=0.01"]

# (id, overrides, training-time routing?, passes the probe)
PROBES = [
    ("expert_choice-train", EXPERT_CHOICE, True, False),
    ("expert_choice-eval", EXPERT_CHOICE, False, False),
    ("race-train", RACE, True, False),
    ("race-eval-ema", RACE, False, True),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,overrides,train_mode,causal", PROBES, ids=[p[0] for p in PROBES])
def test_causality_probe(name, overrides, train_mode, causal):
    from megamoe.moe.routers import ROUTERS

    opted_in = overrides + ["model.moe.allow_non_causal=true"]
    cfg = tiny_config(opted_in)
    assert not ROUTERS[cfg.model.moe.router].causal_for(cfg.model.moe)   # declared non-causal
    prefix_diff, total_diff = run_distributed(probe_task, 1, opted_in, train_mode=train_mode)[0]
    assert total_diff > 1e-3          # the perturbation reaches later positions
    if causal:
        assert prefix_diff < 1e-6
    else:
        assert prefix_diff > 1e-6


@pytest.mark.parametrize("overrides", [EXPERT_CHOICE, RACE], ids=["expert_choice", "race"])
def test_refused_without_opt_in(overrides):
    from megamoe.moe.routers import check_router_causality

    with pytest.raises(ValueError, match="model.moe.router.*allow_non_causal"):
        check_router_causality(tiny_config(overrides))
    check_router_causality(tiny_config(overrides + ["model.moe.allow_non_causal=true"]))


@pytest.mark.parametrize("router", ["expert_choice", "race"])
@pytest.mark.parametrize("field,value", [("capacity_factor", "1.0"), ("z_loss_coeff", "0.001")])
def test_token_choice_options_are_refused(router, field, value):
    from megamoe.config import ConfigError

    with pytest.raises(ConfigError, match=f"model.moe.{field}"):
        tiny_config(BASE + [f"model.moe.router={router}", f"model.moe.{field}={value}"])
