"""EC-DiT (Sun et al. 2024): expert choice within each image, i.e. the `expert_choice` router
with the `sequence` selection group (configs/moe/ec_dit.yaml). A hand vector through the router
(B = 2 images, s = 3 tokens, E = 2 experts, the scores of test_diffmoe_pool.py): each image's
tokens compete only among themselves, with a capacity per image, in training and evaluation;
one image alone routes as inside the batch."""

from pathlib import Path
from types import SimpleNamespace

import torch

from megamoe.blocks.context import Context
from megamoe.config import load_config
from megamoe.moe.routers import router_builder
from megamoe.moe.routers.expert_choice import ExpertChoiceRouter

REPO = Path(__file__).resolve().parents[3]
# Megatron order t = s·B + b: image b=0 holds t0, t2, t4; image b=1 holds t1, t3, t5.
SCORES = [[.9, .1], [.2, .8], [.6, .4], [.7, .3], [.4, .6], [.45, .55]]
# Capacity per image c = ⌈k·s/E⌉ = ⌈1·3/2⌉ = 2 (Megatron's get_capacity rounds up; the DiffMoE
# repository's EC-DiT baseline takes int(s/E·C) = 1 here; equal whenever E divides C·s).
#   image 0, e0: t0 .9, t2 .6 | t4 .4      e1: t4 .6, t2 .4 | t0 .1
#   image 1, e0: t3 .7, t5 .45 | t1 .2     e1: t1 .8, t5 .55 | t3 .3
# so t2 and t5 get both experts, every other token one; each expert takes 2 tokens per image.
PER_IMAGE_MAP = [[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [1, 1]]
# Over the whole micro-batch instead (c = ⌈6/2⌉ = 3): e0 takes t0 .9, t3 .7, t2 .6 and e1 takes
# t1 .8, t4 .6, t5 .55 — image 1's t5 loses e0 to image 0's t2.
MICRO_BATCH_MAP = [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]]


def ec_router(selection: str) -> ExpertChoiceRouter:
    from megatron.core.transformer import TransformerConfig

    from megamoe.platform.bridge import apply_cpu_bridge

    apply_cpu_bridge()
    cfg = TransformerConfig(num_layers=1, hidden_size=2, num_attention_heads=1,
                            num_moe_experts=2, moe_ffn_hidden_size=4, moe_router_topk=1,
                            moe_router_pre_softmax=True, add_bias_linear=False,
                            use_cpu_initialization=True)
    groups = SimpleNamespace(tp=None, cp=None, tp_cp=None, dp_cp=None, tp_dp_cp=None)
    router = ExpertChoiceRouter(cfg, groups, selection=selection)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))           # logits = ln s, softmax = s
    return router


def test_the_fragment_selects_per_image():
    """configs/moe/ec_dit.yaml, which the dit recipes list under `defaults:`."""
    moe = load_config(REPO / "configs" / "moe" / "ec_dit.yaml").model.moe
    assert moe.router == "expert_choice" and moe.topk == 1
    assert router_builder(moe).keywords == {"selection": "sequence"}


def test_hand_vector_per_image_capacity_in_training_and_evaluation():
    hidden_SBD = torch.tensor(SCORES).log().view(3, 2, 2)
    for selection, want in (("sequence", PER_IMAGE_MAP), ("micro-batch", MICRO_BATCH_MAP)):
        router = ec_router(selection)
        for train in (True, False):
            out = router.train(train).route(hidden_SBD, Context())
            assert out.routing_map_TE.int().tolist() == want, (selection, train)
            assert torch.allclose(out.probs_TE, torch.tensor(SCORES) * out.routing_map_TE)
        assert out.stats["capacity"] == (2 if selection == "sequence" else 3)
    router = ec_router("sequence").eval()
    for b in range(2):                               # one image alone: its in-batch rows
        alone = router.route(hidden_SBD[:, b:b + 1], Context()).routing_map_TE
        assert torch.equal(alone, torch.tensor(PER_IMAGE_MAP).bool().view(3, 2, 2)[:, b])
