"""Router families, one file each; `ROUTERS` maps the config key to the class."""

import functools

from megamoe.moe.routers.base import MegamoeRouter, RouterOutput
from megamoe.moe.routers.diff_moe import DiffMoERouter
from megamoe.moe.routers.diffmoe import DiffMoEPoolRouter
from megamoe.moe.routers.dit_moe import DiTMoERouter
from megamoe.moe.routers.expert_choice import ExpertChoiceRouter
from megamoe.moe.routers.limoe import LIMoERouter
from megamoe.moe.routers.modality import ModalityRouter
from megamoe.moe.routers.moee import MoEERouter
from megamoe.moe.routers.race import RaceRouter
from megamoe.moe.routers.soft import SoftRouter
from megamoe.moe.routers.topk import TopKSoftmaxRouter
from megamoe.moe.routers.vmoe import VMoERouter

ROUTERS = {"topk": TopKSoftmaxRouter}
ROUTERS.update({"moee": MoEERouter, "dit_moe": DiTMoERouter, "soft": SoftRouter,
                "diff_moe": DiffMoERouter})
ROUTERS.update({"expert_choice": ExpertChoiceRouter, "race": RaceRouter})
ROUTERS.update({"vmoe": VMoERouter, "limoe": LIMoERouter, "modality": ModalityRouter})
ROUTERS.update({"diffmoe": DiffMoEPoolRouter})


def router_builder(moe_cfg, vocab_size: int | None = None):
    """What Megatron's `MoELayer` calls as `router(config=..., pg_collection=...)`: the family's
    class with its options from `model.moe` bound (and the vocabulary size for families whose
    router predicts tokens, `needs_vocab_size`)."""
    cls = ROUTERS[moe_cfg.router]
    options = cls.options_from(moe_cfg)
    if getattr(cls, "needs_vocab_size", False):
        options["vocab_size"] = vocab_size
    return functools.partial(cls, **options)


def check_router_causality(cfg) -> None:
    """A non-causal router in this causal decoder is refused unless the config opts in."""
    moe = cfg.model.moe
    cls = ROUTERS[moe.router]
    if moe.num_experts and not cls.causal_for(moe) and not moe.allow_non_causal:
        why = " with model.moe.capacity_factor set" if moe.capacity_factor is not None else ""
        group = cls.selection_group_for(moe)
        raise ValueError(
            f"model.moe.router: '{moe.router}'{why} chooses tokens across the {group}, so a "
            "token's output can depend on later tokens in this causal decoder; set "
            "model.moe.allow_non_causal=true to train it anyway"
        )

__all__ = ["MegamoeRouter", "RouterOutput", "ROUTERS", "TopKSoftmaxRouter", "check_router_causality",
           "router_builder"]
