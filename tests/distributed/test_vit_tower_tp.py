"""A CLIP-exact vision tower (megamoe.models.vit.model.build_vision_tower) under TP2 + sequence
parallelism: its features (gathered, TP-replicated) and every parameter's gradient equal one
process's. The pre-encoder LayerNorm runs before the sequence is split, so it must not take
the sequence-parallel gradient reduction the encoder's norms take: the control reduces it too
and its gradient doubles."""

import pytest
import torch

from megamoe.testing.pool import run_distributed

TOKENS = 26      # 20 px / patch 4 = 25 patches + the class token: divisible by TP 2


def tower_task(tp: int):
    import torch.distributed as dist

    from megamoe.engines.megatron import build_engine
    from megamoe.models.global_view import gather_global
    from megamoe.models.init import init_global
    from megamoe.models.vit.model import build_vision_tower, transformer_config
    from megamoe.testing.parity import TINY_VIT, tiny_config

    cfg = tiny_config([
        f"parallel.world_size={tp}", f"parallel.tensor={tp}", "parallel.sequence_parallel=true",
        *TINY_VIT, "model.moe.num_experts=0", "model.num_query_groups=4", "data.image_size=20",
        "model.vit.pre_norm=true", "model.vit.patch_bias=false",
        "model.vit.activation=quick_gelu", "model.vit.vision_feature_layer=-2",
        "model.vit.vision_feature_select_strategy=full"])
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    tconfig = transformer_config(cfg, engine.dims, sequence_parallel=engine.dims.sequence_parallel,
                                 dtype=torch.float32, tower=True)
    tower = build_vision_tower(cfg, tconfig, engine.grid)
    init_global([tower], 7, 0.3, cfg.model.num_layers)   # layout-independent, not small
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 20, 20, generator=g) * 2 - 1
    weights_SBD = torch.randn(TOKENS, 2, 32, generator=g)
    features_SBD = tower.features(images)
    (features_SBD * weights_SBD).sum().backward()
    tp_group = engine.grid.tp
    for p in tower.parameters():     # what Megatron's finalize_model_grads does under SP
        if getattr(p, "sequence_parallel", False) and tp > 1:
            dist.all_reduce(p.grad, group=tp_group)
    grads = gather_global([tower], grads=True)
    if tp > 1:                       # control: the pre-LayerNorm reduced as if sequence-split
        for p in tower.embedding.pre_norm.parameters():
            dist.all_reduce(p.grad, group=tp_group)
    control = gather_global([tower], grads=True)
    return {"sp": tconfig.sequence_parallel, "features": features_SBD.detach(),
            "grads": grads, "control": control}


@pytest.mark.timeout(300)
def test_tower_tp2_sp_matches_one_process():
    ref = run_distributed(tower_task, 1, 1)[0]
    got = run_distributed(tower_task, 2, 2)
    assert got[0]["sp"] and not ref["sp"]
    assert ref["features"].shape == (TOKENS, 2, 32)
    for r in got:        # TP-replicated features
        assert (r["features"] - ref["features"]).abs().max() <= 1e-5
    scale = max(t.abs().max().item() for t in ref["grads"].values())
    for key, want in ref["grads"].items():
        assert (got[0]["grads"][key] - want).abs().max() <= 1e-5 * scale, key
    err = (got[0]["control"]["embedding.pre_norm.weight"]
           - ref["grads"]["embedding.pre_norm.weight"]).abs().max()
    assert err > 1e-3 * scale
