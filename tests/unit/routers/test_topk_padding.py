"""megamoe's top-k MoE layer with a padding mask: the real tokens' outputs, the balancing losses
(Switch, sequence-wise, global), the z-loss, the loss-free counts and every gradient are those
of the same tokens without the pads; capacity counts real tokens only. Negative control: the
same padded batch without the mask changes the balancing loss and the gate's gradient.

One gloo rank of the test pool; a tiny MoE layer (D = 32, E = 4, k = 2), S = 8 real tokens per
sequence, 3 pads inserted at random positions of each of B = 3 sequences.
"""

import pytest
import torch

from megamoe.testing.pool import run_distributed

S, B, PADS = 8, 3, 3
LOSS_NAME = {"switch": "load_balancing_loss", "sequence": "seq_load_balancing_loss",
             "global": "global_load_balancing_loss"}


def moe_layer(overrides, world: int = 1):
    from megatron.core.transformer.spec_utils import build_module

    from megamoe.models.lm.model import transformer_config
    from megamoe.specs.gpt_moe import moe_spec
    from megamoe.moe.routers import router_builder
    from megamoe.parallel import ParallelDims, init_groups, seed_rng
    from megamoe.testing.parity import tiny_config

    cfg = tiny_config([f"parallel.world_size={world}", "model.init_method_std=0.2", *overrides])
    dims = ParallelDims.from_config(cfg.parallel)
    pg = init_groups(dims)
    seed_rng(0)
    tc = transformer_config(cfg, dims, sequence_parallel=False, dtype=torch.float32)
    spec = moe_spec(router_builder(cfg.model.moe), False, pg)
    layer = build_module(spec, config=tc, layer_number=1)
    layer.set_layer_number(1)         # what TransformerLayer does: the loss tracker's index
    layer.train()
    return layer, tc.hidden_size


def padded_batch(x_SBD):
    """x with PADS random rows inserted per sequence: (x_pad [S+P, B, D], pad_BS, real_BS)."""
    g = torch.Generator().manual_seed(7)
    Sp = S + PADS
    pad_BS = torch.zeros(B, Sp, dtype=torch.bool)
    for b in range(B):
        pad_BS[b, torch.randperm(Sp, generator=g)[:PADS]] = True
    x_pad = torch.randn(Sp, B, x_SBD.shape[-1], generator=g) * 3   # pads: unlike real tokens
    x_pad[~pad_BS.T] = _real_rows(x_SBD, pad_BS)
    return x_pad, pad_BS


def _real_rows(x_SBD, pad_BS):
    """x's rows in the order boolean indexing of [S+P, B] visits the real positions."""
    real_SB = ~pad_BS.T
    rank_SB = real_SB.long().cumsum(0) - 1               # index among the sequence's real tokens
    s_idx, b_idx = real_SB.nonzero(as_tuple=True)
    return x_SBD[rank_SB[s_idx, b_idx], b_idx]


def run_layer(layer, x_SBD, w_SBD, padding_mask=None):
    """(output, losses logged by the router, gradients, loss-free counts) of one forward and
    backward of Σ w·out (+ the attached aux losses)."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    clear_aux_losses_tracker()
    layer.router.reset_global_aux_loss_tracker()     # global loss: this batch's counts only
    layer.zero_grad()
    counts = getattr(layer.router, "step_tokens_per_expert", None)
    if counts is not None:
        counts.zero_()
    x = x_SBD.clone().requires_grad_(True)
    out, _ = layer(x, padding_mask=padding_mask)
    (out * w_SBD).sum().backward()
    logged = {name: v["values"][0].item()
              for name, v in get_moe_layer_wise_logging_tracker().items()}
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), logged, grads, x.grad, None if counts is None else counts.clone()


def padding_task(overrides):
    layer, D = moe_layer(overrides)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(S, B, D, generator=g)
    w = torch.randn(S, B, D, generator=g)
    x_pad, pad_BS = padded_batch(x)
    real_SB = ~pad_BS.T
    w_pad = torch.zeros(S + PADS, B, D)
    w_pad[real_SB] = _real_rows(w, pad_BS)               # the pads' outputs are not used

    ref = run_layer(layer, x, w)
    got = run_layer(layer, x_pad, w_pad, padding_mask=pad_BS)
    unmasked = run_layer(layer, x_pad, w_pad)
    out_err = (got[0][real_SB] - _real_rows(ref[0], pad_BS)).abs().max().item()
    pad_out = got[0][~real_SB].abs().max().item()
    loss_err = {k: abs(got[1][k] - ref[1][k]) for k in ref[1]}
    grad_err = max(((got[2][n] - ref[2][n]).abs().max() / ref[2][n].abs().max()).item()
                   for n in ref[2])                  # relative, DESIGN.md's GRAD_RTOL
    x_grad_err = (got[3][real_SB] - _real_rows(ref[3], pad_BS)).abs().max().item()
    counts_err = None if ref[4] is None else (got[4] - ref[4]).abs().max().item()
    gate = next(n for n in ref[2] if "router" in n)
    control = {k: abs(unmasked[1][k] - ref[1][k]) for k in ref[1]}
    control_grad = (unmasked[2][gate] - ref[2][gate]).abs().max().item()
    return dict(out_err=out_err, pad_out=pad_out, loss_err=loss_err, grad_err=grad_err,
                x_grad_err=x_grad_err, counts_err=counts_err, losses=ref[1], control=control,
                control_grad=control_grad, grad_scale=ref[2][gate].abs().max().item(),
                n_grads=len(ref[2]))


Z = ["model.moe.z_loss_coeff=0.01", "model.moe.aux_loss_coeff=0.1"]
CASES = [
    ("switch", Z + ["model.moe.aux_loss_type=switch"]),
    ("sequence", Z + ["model.moe.aux_loss_type=sequence"]),
    ("global", Z + ["model.moe.aux_loss_type=global"]),
    ("loss_free_sigmoid", Z + ["model.moe.score_function=sigmoid",
                               "model.moe.loss_free_bias_rate=0.01"]),
    ("capacity", Z + ["model.moe.capacity_factor=1.0", "model.moe.allow_non_causal=true"]),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] for c in CASES])
def test_pads_change_nothing_for_real_tokens(name, overrides):
    r = run_distributed(padding_task, 1, overrides)[0]
    aux = LOSS_NAME.get(name, "load_balancing_loss")
    assert r["losses"][aux] > 0 and r["losses"]["z_loss"] > 0 and r["n_grads"] >= 3
    assert r["out_err"] < 1e-6 and r["x_grad_err"] < 1e-6
    assert r["pad_out"] == 0.0                       # pads go to no expert
    assert r["grad_err"] < 1e-5, r["grad_err"]       # gate and experts
    assert all(e < 1e-6 for e in r["loss_err"].values()), r["loss_err"]
    if name == "loss_free_sigmoid":
        assert r["counts_err"] == 0.0
    # negative control: the same pads without the mask enter the balancing loss and z-loss
    assert r["control"][aux] > 1e-3 * r["losses"][aux], (r["control"], r["losses"])
    assert r["control"]["z_loss"] > 1e-3 * r["losses"]["z_loss"]
    assert r["control_grad"] > 1e-3 * r["grad_scale"]


def all_pads_task():
    """A micro-batch of pads only (a recursion step keeping no token): no NaN, no loss."""
    layer, D = moe_layer(Z + ["model.moe.aux_loss_type=sequence"])
    x = torch.randn(4, 2, D)
    pad_BS = torch.ones(2, 4, dtype=torch.bool)
    out, logged, grads, x_grad, _ = run_layer(layer, x, torch.ones_like(x), padding_mask=pad_BS)
    return (out.abs().max().item(), logged,
            max(g.abs().max().item() for g in grads.values()) if grads else 0.0,
            bool(torch.isfinite(x_grad).all()))


@pytest.mark.timeout(120)
def test_all_pads_route_nothing_and_lose_nothing():
    out, logged, grad, finite = run_distributed(all_pads_task, 1)[0]
    assert out == 0.0 and grad == 0.0 and finite
    assert "seq_load_balancing_loss" in logged and "z_loss" in logged
    assert all(v == 0.0 for v in logged.values()), logged


def ep2_all_pads_task():
    """EP2: rank 1 holds only pads (sends no token in the all-to-all, receives rank 0's)."""
    import torch.distributed as dist

    layer, D = moe_layer(Z + ["parallel.expert=2"], world=2)
    rank = dist.get_rank()
    x = torch.randn(4, 2, D, generator=torch.Generator().manual_seed(5))
    w = torch.randn(4, 2, D, generator=torch.Generator().manual_seed(6))
    both = run_layer(layer, x, w)
    pad_BS = torch.full((2, 4), rank == 1)
    alone = run_layer(layer, x, w * (rank == 0), padding_mask=pad_BS)
    finite = all(bool(torch.isfinite(g).all()) for g in alone[2].values())
    return (alone[0] - both[0]).abs().max().item(), alone[0].abs().max().item(), finite


@pytest.mark.timeout(120)
def test_ep2_rank_of_pads_dispatches_nothing():
    (err0, _, finite0), (_, out1, finite1) = run_distributed(ep2_all_pads_task, 2)
    assert err0 < 1e-6 and finite0        # rank 0's tokens: as when rank 1 held real tokens
    assert out1 == 0.0 and finite1
