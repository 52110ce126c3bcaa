"""DiT-MoE gate (papers.md §6): the family's defaults give §14 T12 (expert-level balance loss
Σ f_i P_i = 0.994779, α = 0.005 → 0.004974) through the router itself, with the raw top-2
softmax weights (hand-computed) and the shared expert required."""

import os

import pytest
import torch

from megamoe.config import ConfigError, load_config
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
DIT = ["model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=64"]
T12_LOGITS = [[1, .5, 0, -1], [0, 0, 2, 1], [.3, .2, .1, 0]]


def route_t12(overrides):
    """Route 3 tokens whose logits are T12's (x_t = unit vector t, W[e, t] = logit[t][e]);
    returns (probs, routing map, tracked balance loss / α, α)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from megamoe.models.lm.model import moe_layers
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *overrides])
    router = moe_layers(build_engine(cfg, 64, torch.device("cpu"), with_optimizer=False,
                                     ddp=False).modules)[0].router
    router.train()
    D = cfg.model.hidden_size
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :3] = torch.tensor(T12_LOGITS).T
    x_SBD = torch.eye(3, D)[:, None, :].requires_grad_()
    clear_aux_losses_tracker()
    out = router.route(x_SBD, None)
    tracked = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    return (out.probs_TE.detach(), out.routing_map_TE, tracked[router.layer_number - 1].item(),
            router.get_aux_loss_coeff("aux_loss"))


@pytest.mark.timeout(300)
def test_t12_from_the_family_defaults():
    probs, chosen, balance, alpha = run_distributed(
        route_t12, 1, DIT + ["model.moe.aux_loss_coeff=0.005", "model.moe.z_loss_coeff=0"])[0]
    assert chosen.tolist() == [[True, True, False, False], [False, False, True, True],
                               [True, True, False, False]]
    assert balance == pytest.approx(0.994779, abs=1e-6)
    assert alpha * balance == pytest.approx(0.004974, abs=1e-6)
    # softmax([1, .5, 0, -1]) = [.473991, .287490, .174371, .064148]: the top-2 stay raw
    assert probs[0].tolist() == pytest.approx([.473991, .287490, 0, 0], abs=1e-6)
    assert probs.sum(dim=-1).max() < 0.9


def test_recipe_uses_the_paper_alpha_and_a_shared_expert():
    cfg = load_config(os.path.join(ROOT, "configs", "dit_moe.yaml"))
    moe = cfg.model.moe
    assert (moe.router, moe.topk, moe.aux_loss_coeff) == ("dit_moe", 2, 0.005)
    assert moe.shared_expert_ffn_hidden_size == 2 * cfg.model.hidden_size   # code: 2·D


def test_config_requires_the_shared_expert_and_softmax():
    tiny_config(DIT)
    with pytest.raises(ConfigError, match="model.moe.shared_expert_ffn_hidden_size"):
        tiny_config(["model.moe.router=dit_moe"])
    tiny_config(["model.moe.router=dit_moe", "model.moe.dit_moe.require_shared_expert=false"])
    with pytest.raises(ConfigError, match="model.moe.score_function"):
        tiny_config(DIT + ["model.moe.score_function=sigmoid"])
    with pytest.raises(ConfigError, match="model.moe.aux_loss_type"):
        tiny_config(DIT + ["model.moe.aux_loss_type=sequence"])
