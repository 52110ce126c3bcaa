"""Soft MoE (papers.md §13c): §14 T10 (dispatch, combine, slot inputs), a hand-computed
l2-normalised case, the layer's output against Y = C·[E_{s//p}(X̃_s)] computed from its own
modules, and the slot-count resolution of the config."""

import math

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.moe.routers.soft import dispatch_combine, soft_logits
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

SOFT = ["model.moe.router=soft", "model.moe.allow_non_causal=true"]


def test_t10_dispatch_combine_and_slot_inputs():
    x = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    phi = torch.tensor([[1.0, 0], [0, 2]])          # Φ's columns, one row per slot
    logits = soft_logits(x, phi, scale=None)
    assert logits.tolist() == [[1, 0], [0, 2], [1, 2]]
    d, c = dispatch_combine(logits)
    assert torch.allclose(d.T, torch.tensor([[.422319, .155362, .422319],
                                             [.063379, .468311, .468311]]), atol=1e-6)
    assert torch.allclose(c, torch.tensor([[.731059, .268941], [.119203, .880797],
                                           [.268941, .731059]]), atol=1e-6)
    assert torch.allclose(d.T @ x, torch.tensor([[.844638, .577681], [.531689, .936621]]),
                          atol=1e-6)


def test_l2_normalised_logits_by_hand():
    # x̂ = [.6, .8], [0, 1]; Φ̂ rows = [1, 0], [0, 1], [1, 1]/√2; scale 2
    x = torch.tensor([[3.0, 4], [0, 2]])
    phi = torch.tensor([[2.0, 0], [0, 5], [1, 1]])
    logits = soft_logits(x, phi, scale=torch.tensor([2.0]))
    want = [[1.2, 1.6, 1.4 * math.sqrt(2)], [0, 2, math.sqrt(2)]]
    assert torch.allclose(logits, torch.tensor(want), atol=1e-6)
    d, _ = dispatch_combine(logits)
    # slot 0: softmax([1.2, 0]) = [σ(1.2), σ(−1.2)] → σ(1.2)·[3, 4] + σ(−1.2)·[0, 2]
    s = 1 / (1 + math.exp(-1.2))
    assert torch.allclose((d.T @ x)[0], torch.tensor([3 * s, 4 * s + 2 * (1 - s)]), atol=1e-6)


def test_slots_per_expert_from_the_capacity_factor():
    # m = seq 16 × micro-batch 2 = 32 tokens, n = 4: p = round(m·C/n)
    assert tiny_config(SOFT).model.moe.soft.slots_per_expert == 8
    assert tiny_config(SOFT + ["model.moe.soft.capacity_factor=0.3"]
                       ).model.moe.soft.slots_per_expert == 2          # round(2.4)
    assert tiny_config(SOFT + ["model.moe.soft.slots_per_expert=3"]
                       ).model.moe.soft.slots_per_expert == 3


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.moe.capacity_factor"):
        tiny_config(SOFT + ["model.moe.capacity_factor=1.0"])
    with pytest.raises(ConfigError, match="model.moe.soft.slots_per_expert.*parallel.tensor"):
        tiny_config(SOFT + ["model.moe.num_experts=3", "model.moe.soft.slots_per_expert=3",
                            "parallel.world_size=2", "parallel.tensor=2"])     # 9 slots
    with pytest.raises(ConfigError, match="model.moe.soft.capacity_factor"):
        tiny_config(SOFT + ["model.moe.soft.capacity_factor=0"])


def layer_output_vs_formula(overrides):
    from megamoe.models.lm.model import moe_layers
    from megamoe.moe.soft_layer import SoftMoELayer
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *SOFT, *overrides])
    layer = moe_layers(build_engine(cfg, 64, torch.device("cpu"), with_optimizer=False,
                                    ddp=False).modules)[0]
    assert isinstance(layer, SoftMoELayer)
    with torch.no_grad():
        layer.router.l2_norm.weight.fill_(3.0)
        for p in layer.experts.parameters():      # outputs of order 1, not 1e-5
            p.mul_(30.0)
    g = torch.Generator().manual_seed(5)
    x_SBD = torch.randn(cfg.model.seq_length, cfg.train.micro_batch_size,
                        cfg.model.hidden_size, generator=g) + 1.0
    with torch.no_grad():
        out_SBD, _ = layer(x_SBD)
        x_MD = x_SBD.reshape(-1, x_SBD.shape[-1])
        d, c = dispatch_combine(soft_logits(x_MD, layer.router.weight,
                                            layer.router.l2_norm.weight))
        slots_ND = d.T @ x_MD
        p = layer.router.slots_per_expert
        y_ND = torch.cat([layer.experts.local_experts[s // p](slots_ND[s:s + 1])[0]
                          for s in range(slots_ND.shape[0])])
        want_MD = c @ y_ND
    return (out_SBD.reshape_as(want_MD) - want_MD).abs().max().item(), want_MD.abs().max().item()


@pytest.mark.timeout(300)
def test_layer_output_is_combine_of_expert_slot_outputs():
    err, scale = run_distributed(layer_output_vs_formula, 1,
                                 ["model.moe.soft.slots_per_expert=3"])[0]
    assert scale > 0.1 and err < 1e-5 * scale
