"""Causality of the MoEE, DiT-MoE, Soft MoE and Diff-MoE families (DESIGN.md, Causality):
the causal ones (per-token gates; Diff-MoE's synthetic timestep depends only on the first token)
pass the probe; Soft MoE's slots mix the whole micro-batch, so it fails the probe and is refused
without model.moe.allow_non_causal=true."""

import pytest

from megamoe.testing.causality import probe_task
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

# (id, overrides, declared causal)
FAMILIES = [
    ("moee", ["model.moe.router=moee", "model.moe.topk=4"], True),
    ("dit_moe", ["model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=64"], True),
    ("soft", ["model.moe.router=soft"], False),
    ("diff_moe", ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8",
                  "data.synthetic_timesteps=true"], True),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,overrides,causal", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_causality_probe_matches_the_declaration(name, overrides, causal):
    from megamoe.moe.routers import ROUTERS

    opted_in = overrides + ["model.moe.allow_non_causal=true"]
    cfg = tiny_config(opted_in)
    assert ROUTERS[cfg.model.moe.router].causal_for(cfg.model.moe) == causal
    prefix_diff, total_diff = run_distributed(probe_task, 1, opted_in)[0]
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
