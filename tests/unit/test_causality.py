"""Causality probe (DESIGN.md): perturb token t+1 and check the outputs up to t are unchanged.
Every router family declared causal passes; every family declared non-causal fails the probe
(which is why it is refused in a causal decoder without the opt-in)."""

import pytest

from megamoe.testing.causality import probe_task
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

# (id, overrides, declared causal)
FAMILIES = [
    ("topk_dropless", [], True),
    ("topk_sigmoid_raw_lossfree", ["model.moe.score_function=sigmoid",
                                   "model.moe.renormalize=false",
                                   "model.moe.loss_free_bias_rate=0.01"], True),
    ("topk_capacity", ["model.moe.capacity_factor=0.5"], False),
    ("topk_capacity_position", ["model.moe.capacity_factor=0.5",
                                "model.moe.drop_policy=position"], False),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,overrides,causal", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_causality_probe_matches_the_declaration(name, overrides, causal):
    from megamoe.moe.routers import ROUTERS

    cfg = tiny_config(overrides + ["model.moe.allow_non_causal=true"])
    assert ROUTERS[cfg.model.moe.router].causal_for(cfg.model.moe) == causal
    prefix_diff, total_diff = run_distributed(
        probe_task, 1, overrides + ["model.moe.allow_non_causal=true"])[0]
    assert total_diff > 1e-3          # the perturbation reaches later positions
    if causal:
        assert prefix_diff < 1e-6
    else:
        assert prefix_diff > 1e-6


@pytest.mark.parametrize("name,overrides,causal", [f for f in FAMILIES if not f[2]],
                         ids=[f[0] for f in FAMILIES if not f[2]])
def test_non_causal_family_is_refused_without_opt_in(name, overrides, causal):
    from megamoe.moe.routers import check_router_causality

    with pytest.raises(ValueError, match="model.moe.router.*allow_non_causal"):
        check_router_causality(tiny_config(overrides))
    check_router_causality(tiny_config(overrides + ["model.moe.allow_non_causal=true"]))
