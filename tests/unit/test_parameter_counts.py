"""The family's parameter count (`Family.parameter_counts`: printed at start, used for FLOPs
and the MoR comparison) equals the built model's parameter count (without the vocabulary's padding rows,
megamoe.models.vocab) for every shipped recipe, on one rank —
including router families with parameters of their own (Soft MoE slots, Diff-MoE timestep gate
and calibration, Expert Race's PLR head). Control: those families really add parameters, so a
count that ignored them would fail."""

import glob
import os

import pytest
import torch

from megamoe.testing.pool import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
VOCAB = 64


def counts_task(recipe: str, overrides=()):
    """(built, counted, counted without the family's own router parameters)."""
    from megamoe.commands.convert import _single_rank_overrides
    from megamoe.config import load_config
    from megamoe.models.vocab import padding_elements
    from megamoe.moe.routers import ROUTERS
    from megamoe.engines.megatron import build_engine
    from megamoe.models.registry import family_for

    from megamoe.models.registry import family_datasets

    cfg = load_config(os.path.join(ROOT, "configs", recipe),
                      [*_single_rank_overrides(), *overrides])
    # the size of what the model predicts: the lm's vocabulary (any), else the data's (classes
    # of an image set, the vlm's word vocabulary), as the engine gets it in training
    out = VOCAB if cfg.model.family == "lm" else family_datasets(cfg)[2]
    engine = build_engine(cfg, out, torch.device("cpu"), with_optimizer=False, ddp=False)
    built = (sum(p.numel() for p in engine.modules[0].parameters())
             - padding_elements(engine.modules))
    counted = family_for(cfg).parameter_counts(cfg, out)[0]
    cls = ROUTERS[cfg.model.moe.router]
    moe_layers = sum(1 for m in engine.modules[0].modules() if hasattr(m, "router")
                     and isinstance(m.router, cls))
    return built, counted, counted - moe_layers * cls.extra_parameters(
        cfg.model.moe, cfg.model.hidden_size, out)[0]


CASES = [(r, ()) for r in RECIPES] + [("race.yaml", ("model.moe.race.plr_coeff=0.1",))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("recipe,overrides", CASES,
                         ids=[r.removesuffix(".yaml") + ("_plr" if o else "") for r, o in CASES])
def test_parameter_count_is_the_built_models(recipe, overrides):
    built, counted, without_family = run_distributed(counts_task, 1, recipe, overrides)[0]
    assert counted == built
    if recipe in ("soft.yaml", "diff_moe.yaml") or overrides:
        assert without_family != built          # control: the family's parameters matter
