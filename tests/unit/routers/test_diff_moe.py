"""Diff-MoE (papers.md §8a, no §14 vector): hand-computed expert calibration and calibrated
expert input, the timestep-conditioned gate, adaLN-Zero at initialisation, and the MoE layer's
output against Σ_topk s_e (x + gate_e ⊙ FFN_e(LN(x)(1 + scale_e) + shift_e)) computed token by
token from its own modules."""

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.moe.routers.diff_moe import ExpertCalibration, calibrated_expert_input
from megamoe.testing.parity import tiny_config
from megamoe.testing.pool import run_distributed

DIFF = ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8",
        "data.synthetic_timesteps=true"]


def test_expert_calibration_by_hand():
    cal = ExpertCalibration(num_experts=2, context_dim=2, rank=1, hidden=1)
    with torch.no_grad():
        cal.weight_in.copy_(torch.tensor([[[1.0, -1.0]], [[0.5, 0.5]]]))
        cal.bias_in.copy_(torch.tensor([[0.5], [0.0]]))
        cal.adaln_zero_weight.copy_(torch.tensor([[[1.0], [2.0], [3.0]], [[1.0], [-1.0], [2.0]]]))
        cal.adaln_zero_bias.copy_(torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]]))
    # c = [1, 2]: h_0 = ReLU(1 − 2 + 0.5) = 0, h_1 = ReLU(0.5 + 1) = 1.5
    shift, scale, gate = cal(torch.tensor([[1.0, 2.0]]))
    assert shift[0, :, 0].tolist() == pytest.approx([0.1, 1.5])
    assert scale[0, :, 0].tolist() == pytest.approx([0.2, -1.5])
    assert gate[0, :, 0].tolist() == pytest.approx([0.3, 3.0])


def test_calibrated_input_by_hand():
    # LN([1, 3]) = [−1, 1] (to eps); × (1 + [1, 0]) + 0.5 = [−1.5, 1.5]
    x = calibrated_expert_input(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, 0.5]]),
                                torch.tensor([[1.0, 0.0]]))
    assert x.tolist()[0] == pytest.approx([-1.5, 1.5], abs=1e-4)


def test_config_checks():
    tiny_config(DIFF)
    with pytest.raises(ConfigError, match="model.moe.score_function"):
        tiny_config(DIFF + ["model.moe.score_function=sigmoid"])
    with pytest.raises(ConfigError, match="model.moe.capacity_factor"):
        tiny_config(DIFF + ["model.moe.capacity_factor=1.0"])
    with pytest.raises(ConfigError, match="model.moe.token_dispatcher"):
        tiny_config(DIFF + ["model.moe.token_dispatcher=allgather"])
    with pytest.raises(ConfigError, match="model.moe.diff_moe.calibration_rank"):
        tiny_config(DIFF + ["model.moe.diff_moe.calibration_rank=0"])


def layer_checks():
    """(adaLN-Zero at init, max error of the layer against the formula, output scale, gate
    logits' change with the timestep, error message without the timestep)."""
    from megamoe.data.synthetic_context import timestep_embedding
    from megamoe.models.lm.model import moe_layers
    from megamoe.blocks.context import Context, bind
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", *DIFF, "model.moe.z_loss_coeff=0"])
    layer = moe_layers(build_engine(cfg, 64, torch.device("cpu"), with_optimizer=False,
                                    ddp=False).modules)[0]
    router, cal = layer.router, layer.router.calibration
    zero_init = (cal.adaln_zero_weight.abs().max().item() == 0
                 and cal.weight_in.abs().max().item() > 0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        cal.adaln_zero_weight.normal_(0, 0.5, generator=g)
        cal.adaln_zero_bias.normal_(0, 0.5, generator=g)
        router.timestep_weight.normal_(0, 0.5, generator=g)
        for p in layer.experts.parameters():
            p.mul_(30.0)
    S, B, D = 6, 3, cfg.model.hidden_size
    c_BC = timestep_embedding(torch.tensor([5, 300, 999]), D)
    context = Context(timestep_emb_BD=c_BC)
    x_SBD = torch.randn(S, B, D, generator=g)
    layer.eval()
    with torch.no_grad():
        with bind(context):
            out_SBD, _ = layer(x_SBD)
        routed = router.route(x_SBD, context)
        shift_BED, scale_BED, gate_BED = cal(c_BC)
        x_TD = x_SBD.reshape(-1, D)
        want_TD = torch.zeros_like(x_TD)
        for t in range(x_TD.shape[0]):
            b = t % B                                       # Megatron's [S, B] order
            for e in routed.routing_map_TE[t].nonzero().flatten().tolist():
                xin = calibrated_expert_input(x_TD[t:t + 1], shift_BED[b, e], scale_BED[b, e])
                ffn = layer.experts.local_experts[e](xin)[0]
                want_TD[t] += routed.probs_TE[t, e] * (x_TD[t] + gate_BED[b, e] * ffn[0])
        err = (out_SBD.reshape_as(want_TD) - want_TD).abs().max().item()
        # the gate sees the timestep: same tokens, other timesteps → other logits
        other = Context(timestep_emb_BD=timestep_embedding(torch.tensor([1, 2, 3]), D))
        moved = (router.route(x_SBD, other).probs_TE - routed.probs_TE).abs().max().item()
    try:
        router.route(x_SBD, Context())
        message = ""
    except ValueError as exc:
        message = str(exc)
    return zero_init, err, want_TD.abs().max().item(), moved, message


@pytest.mark.timeout(300)
def test_layer_matches_the_formula_token_by_token():
    zero_init, err, scale, moved, message = run_distributed(layer_checks, 1)[0]
    assert zero_init
    assert scale > 0.1 and err < 1e-5 * scale
    assert moved > 1e-3
    assert "timestep_emb_BD" in message and "diff_moe" in message
