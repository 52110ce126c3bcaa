"""Every MoR parameter and buffer (unique layers, shared pool with MoE experts under EP2, depth
router weights, the token-choice loss-free `router_bias`) round-trips through save/load."""

import pytest

from megamoe.testing.checkpointing import save_then_load
from megamoe.testing.pool import run_distributed

MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3",
       "parallel.expert=2"]
ROUTERS = {"expert": ["model.mor.allow_non_causal=true"],
           "token": ["model.mor.router=token", "model.mor.token.balancing=loss_free"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_mor_parameter_and_buffer_round_trips(router, tmp_path):
    overrides = MOR + ROUTERS[router]
    out = run_distributed(save_then_load, 2, overrides, str(tmp_path), overrides)[0]
    assert out["differ"] == [], out["differ"]
    keys = out["keys"]
    assert any(k.startswith("decoder.recursion.layers.1.mlp.experts") for k in keys)
    assert any(k.startswith("decoder.layers.1.") for k in keys)       # unique last layer
    router_keys = [k for k in keys if k.startswith("decoder.recursion.router.")]
    expected = ({"decoder.recursion.router.router.weight", "decoder.recursion.router.router_bias"}
                if router == "token" else
                {f"decoder.recursion.router.routers.{r}.weight" for r in range(3)})
    assert set(router_keys) == expected
