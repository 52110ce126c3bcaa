"""The MoR decoder inside GPTModel, on one gloo rank of the test pool:

- the depth-router loss joins the LM loss scaled per token like Megatron's MoE aux losses under
  `calculate_per_token_loss`: Megatron's schedule backpropagates Σ_mb (Σ_t CE_t + L_aux·S·B),
  checked against autograd of that sum written out by hand (negative control: without L_aux);
- a recursion step that keeps no token still runs (one pad per sequence), so every rank runs
  every step and the MoE collectives of shared layers stay matched under expert parallelism;
- the parameter count of `megamoe.mor.accounting` is the built model's; FLOPs per token follow
  the capacities (hand-computed).
"""

import pytest
import torch

from megamoe.testing.pool import run_distributed

MOR = ["parallel.world_size=1", "model.num_layers=8", "model.mor.enabled=true",
       "model.mor.num_recursions=3", "train.global_batch_size=4"]   # 2 micro-batches of 2
EXPERT = MOR + ["model.mor.allow_non_causal=true", "model.mor.aux_loss_coeff=0.5",
                "model.moe.num_experts=0"]


def _engine(overrides):
    from megamoe.testing.parity import TINY_VOCAB, tiny_config
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(overrides)
    return build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False, ddp=False)


def _microbatches(cfg):
    from megamoe.testing.parity import TINY_VOCAB, rank_microbatches

    t = cfg.train
    return rank_microbatches(0, 0, 1, t.micro_batch_size, t.global_batch_size,
                             cfg.model.seq_length, TINY_VOCAB)


def aux_scale_task():
    from megamoe.mor.decoder import mor_decoders
    from megamoe.engines.megatron import run_forward_backward

    engine = _engine(EXPERT)
    model = engine.modules[0]
    decoder = mor_decoders([model])[0]
    router_w = decoder.recursion.router.routers[1].weight
    mbs = _microbatches(engine.cfg)
    run_forward_backward(engine, mbs)                   # Megatron's schedule (no DDP: no /N)
    got = router_w.grad.clone()
    decoder._with_aux_loss = lambda h_SBD: h_SBD     # by hand: no attachment in the model
    by_hand, no_aux = [], []
    for with_aux in (True, False):
        model.zero_grad()
        for mb in mbs:
            ce_BS = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
            loss = (ce_BS * mb["loss_mask"]).sum()
            if with_aux:
                loss = loss + decoder.recursion.last_aux_loss * ce_BS.numel()
            loss.backward()
        (by_hand if with_aux else no_aux).append(router_w.grad.clone())
    return ((got - by_hand[0]).abs().max().item(), (got - no_aux[0]).abs().max().item(),
            got.abs().max().item())


def empty_step_task():
    """Token-choice with a bias sending every token to depth 0: steps 1 and 2 keep nothing."""
    from megamoe.mor.decoder import mor_decoders

    engine = _engine(MOR + ["model.mor.router=token", "model.mor.token.balancing=loss_free"])
    model = engine.modules[0]
    block = mor_decoders([model])[0].recursion
    block.router.router_bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    calls = []
    block.layers[0].register_forward_pre_hook(lambda mod, args, kw: calls.append(1),
                                              with_kwargs=True)
    mb = _microbatches(engine.cfg)[0]
    with torch.no_grad():
        model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
    return len(calls), block.last_stats


def parameter_count_task(overrides):
    from megamoe.testing.parity import TINY_VOCAB
    from megamoe.models.vocab import padding_elements
    from megamoe.models.accounting import parameter_counts

    engine = _engine(overrides)
    built = (sum(p.numel() for p in engine.modules[0].parameters())
             - padding_elements(engine.modules))    # vocabulary rows padded for TP
    return built, parameter_counts(engine.cfg, TINY_VOCAB)[0]


@pytest.mark.timeout(300)
def test_depth_router_loss_is_scaled_per_token_like_moe_aux_losses():
    err, without_aux, scale = run_distributed(aux_scale_task, 1)[0]
    assert scale > 0 and err < 1e-5 * scale
    assert without_aux > 1e-3 * scale               # negative control: L_aux reaches the router


@pytest.mark.timeout(300)
def test_a_step_that_keeps_nothing_still_runs():
    calls, stats = run_distributed(empty_step_task, 1)[0]
    assert calls == 3                               # pool layer 0 at each of the N_r steps
    assert stats["depth_0_fraction"] == 1.0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", [EXPERT, MOR + ["model.mor.router=token"]],
                         ids=["expert_dense", "token_moe"])
def test_parameter_count_is_the_built_models(overrides):
    built, counted = run_distributed(parameter_count_task, 1, overrides)[0]
    assert built == counted


def test_flops_follow_the_capacities():
    from megamoe.config import load_config
    from megamoe.models.accounting import flops_per_token, parameter_counts
    from megamoe.specs.accounting import layer_parameters

    base = ["model.num_layers=8", "model.seq_length=12", "model.moe.num_experts=0"]
    vanilla = load_config(None, base)
    full = load_config(None, base + EXPERT[2:5] + ["model.mor.allow_non_causal=true",
                                                   "model.mor.capacities=[1.0, 1.0, 1.0]"])
    mor = load_config(None, base + EXPERT[2:5] + ["model.mor.allow_non_causal=true"])
    h, layer = 64, layer_parameters(vanilla, False)[1]
    # capacity 1 everywhere: every token runs all 8 layers, plus 3 routers of h weights
    assert parameter_counts(full, 64)[1] == parameter_counts(vanilla, 64)[1] + 3 * h
    assert flops_per_token(full, 64) == flops_per_token(vanilla, 64) + 6 * 3 * h
    # C = [1, 2/3, 1/3] at S = 12: k = 12, 8, 4; 2 shared layers per step, unique first/last
    frac = [1.0, 8 / 12, 4 / 12]
    emb = parameter_counts(vanilla, 64)[1] - 8 * layer
    active = emb + layer * (2 + 2 * sum(frac)) + h * (1 + 1 + 8 / 12)   # θ_r on step r−1
    assert parameter_counts(mor, 64)[1] == round(active)
    d = 16                                           # 64 / 4 heads
    attention = 6 * 4 * d * (2 * 12 + 2 * sum(12 * f * f for f in frac))
    assert flops_per_token(mor, 64) == pytest.approx(6 * round(active) + attention)
