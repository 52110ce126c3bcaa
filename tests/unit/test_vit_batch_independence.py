"""Batch independence of the recipes' image routers in the vit family (issue 15 item 4): one
image alone gives the logits it gets inside a batch of 8, max |Δ| ≤ 1e-5 —
- DiffMoE in evaluation (σ(p_te) > τ_e per token; τ set inside the predictor's score range so
  that about half of the (token, expert) pairs are routed);
- EC-DiT: expert choice with the `sequence` selection group (each image's tokens compete only
  among themselves), in evaluation and in training mode.
Controls, which must differ: DiffMoE with the reference code's pool top-k inference rule, and
expert choice over the micro-batch."""

import pytest
import torch

from megamoe.testing.parity import TINY_VIT
from megamoe.testing.pool import run_distributed

DIFFMOE = ["model.moe.router=diffmoe", "model.moe.topk=1"]
EC = ["model.moe.router=expert_choice", "model.moe.topk=1"]
CASES = {  # name: (overrides, training mode, batch-independent)
    "diffmoe_threshold": (DIFFMOE, False, True),
    "diffmoe_pool_topk": (DIFFMOE + ["model.moe.diffmoe.inference=pool_topk"], False, False),
    "ec_dit_eval": (EC + ["model.moe.expert_choice.selection_group=sequence"], False, True),
    "ec_dit_train": (EC + ["model.moe.expert_choice.selection_group=sequence"], True, True),
    "expert_choice_micro_batch": (EC, False, False),
}


def alone_vs_batch_task(cases: dict) -> dict:
    """name → (max |Δ logits| of image 3 alone vs inside the batch of 8, max |logits|,
    DiffMoE's experts per token in each MoE layer)."""
    from megamoe.config import load_config
    from megamoe.engines.megatron import build_engine
    from megamoe.models.lm.model import moe_layers
    from megamoe.models.vit.model import vit_context

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    out = {}
    for name, (overrides, train_mode, _) in cases.items():
        cfg = load_config(None, [*TINY_VIT, "parallel.world_size=1",
                                 "model.moe.allow_non_causal=true", *overrides])
        engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
        for layer in moe_layers(engine.modules):
            if hasattr(layer.router, "expert_threshold"):
                layer.router.expert_threshold.fill_(0.5)      # σ(p) ≈ 0.5 ± small at init
        model = engine.modules[0].train(train_mode)
        with torch.no_grad():
            batch = model(images, context=vit_context({"sample_index": torch.arange(8)}))
            alone = model(images[3:4], context=vit_context({"sample_index": torch.tensor([3])}))
        # DiffMoE's routing must be sparse for the check to mean something: experts per token
        active = [layer.router.active_compute() for layer in moe_layers(engine.modules)
                  if hasattr(layer.router, "active_compute")]
        out[name] = ((batch[3:4] - alone).abs().max().item(), batch.abs().max().item(),
                     [a["experts_per_token"] for a in active])
    return out


@pytest.mark.timeout(300)
def test_one_image_alone_equals_it_inside_a_batch_of_8():
    got = run_distributed(alone_vs_batch_task, 1, CASES)[0]
    for name, (_, _, independent) in CASES.items():
        diff, scale, experts_per_token = got[name]
        assert scale > 0.01, (name, scale)
        assert all(0.5 < ept < 3.5 for ept in experts_per_token), (name, experts_per_token)
        if independent:
            assert diff <= 1e-5, (name, diff)
        else:
            assert diff > 1e-3 * scale, (name, diff, scale)
