"""MoEE soft mixing (papers.md §12, no §14 vector): weights softmax over all experts, every
expert gets every token, and the MoE layer's output is Σ_e w_e·E_e(x) — hand-computed values."""

import math

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.moe.routers.moee import soft_mixing
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

MOEE = ["model.moe.router=moee", "model.moe.topk=4"]


def test_weights_are_the_softmax_over_all_experts():
    # softmax([ln 4, ln 2, 0, 0]) = [4, 2, 1, 1] / 8
    probs, routing_map = soft_mixing(torch.tensor([[math.log(4), math.log(2), 0.0, 0.0]]))
    assert torch.allclose(probs, torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert routing_map.all()


def test_config_needs_topk_equal_to_num_experts():
    tiny_config(MOEE)
    with pytest.raises(ConfigError, match="model.moe.topk.*every expert"):
        tiny_config(["model.moe.router=moee"])
    with pytest.raises(ConfigError, match="model.moe.capacity_factor"):
        tiny_config(MOEE + ["model.moe.capacity_factor=1.0"])


def layer_mixes_all_experts():
    """One MoE layer of the tiny model: its output against Σ_e w_e·FFN_e(x) computed from the
    gate weights and the experts' own modules, token by token."""
    from megamoe.blocks.context import Context
    from megamoe.models.lm.model import moe_layers
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *MOEE, "model.moe.z_loss_coeff=0"])
    layer = moe_layers(build_engine(cfg, 64, torch.device("cpu"), with_optimizer=False,
                                    ddp=False).modules)[0]
    layer.eval()
    g = torch.Generator().manual_seed(3)
    x_SBD = torch.randn(5, 2, cfg.model.hidden_size, generator=g)
    with torch.no_grad():
        out_SBD, _ = layer(x_SBD)
        x_TD = x_SBD.reshape(-1, x_SBD.shape[-1])
        w_TE = torch.softmax(x_TD @ layer.router.weight.T, dim=-1)
        want_TD = sum(w_TE[:, e:e + 1] * layer.experts.local_experts[e](x_TD)[0]
                      for e in range(w_TE.shape[1]))
    stats = layer.router.route(x_SBD, Context()).stats
    return (out_SBD.reshape_as(want_TD) - want_TD).abs().max().item(), stats


@pytest.mark.timeout(300)
def test_layer_output_is_the_weighted_mixture_of_all_experts():
    err, stats = run_distributed(layer_mixes_all_experts, 1)[0]
    assert err < 1e-5
    assert stats["experts_per_token"] == 4 and stats["dropped_fraction"] == 0
    assert 0 < stats["router_entropy"] <= math.log(4) + 1e-6
