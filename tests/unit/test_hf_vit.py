"""The vit family's Hugging Face export: a folder `AutoModelForImageClassification` loads offline
with `trust_remote_code=True`, whose logits equal megamoe's eval-mode logits within 1e-4 (V-MoE
routing with an eval capacity and Batch Prioritized Routing over the batch, GQA, class token or
mean pooling, sin-cos positions); loading it without trust_remote_code is refused, a perturbed
expert is seen, and `convert --from hf`'s import gives back the same model."""

from __future__ import annotations

import pytest
import torch

from megamoe.testing.pool import run_distributed

CASES = {
    "cls_learned_bpr": ["model.moe.vmoe.eval_capacity_ratio=0.5"],
    "gap_sincos_soft": ["model.vit.pool=gap", "model.vit.position_embedding=sincos",
                        "model.moe.router=soft"],
    "cls_diffmoe": ["model.moe.router=diffmoe", "model.moe.topk=1"],
}


def export_task(out: str, overrides):
    from transformers import AutoModelForImageClassification

    from megamoe.checkpoint.hf import export_hf, import_hf
    from megamoe.checkpoint.global_load import load_global_into
    from megamoe.checkpoint.router_state import gather_router_buffers, load_router_buffers
    from megamoe.config import load_config
    from megamoe.engines.megatron import build_engine
    from megamoe.models.global_view import gather_global
    from megamoe.testing.parity import TINY_VIT, tiny_config

    cfg = tiny_config(["parallel.world_size=1", *TINY_VIT, *overrides])
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    model = engine.modules[0].eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():           # weights far from the small initialisation
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():   # DiffMoE: τ inside σ(p)'s range (0 routes every pair)
            if hasattr(m, "expert_threshold"):
                m.expert_threshold.fill_(0.5)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ours = model(images)
    export_hf({**gather_global(engine.modules), **gather_router_buffers(engine.modules)},
              cfg, out)
    hf = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True,
                                                         local_files_only=True).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=images).logits
        hf.vit.encoder.layer[1].mlp.experts.fc1_weight[0].add_(0.5)   # negative control
        perturbed = hf(pixel_values=images).logits
    refused = None
    try:
        AutoModelForImageClassification.from_pretrained(out, trust_remote_code=False,
                                                        local_files_only=True)
    except Exception as exc:          # transformers refuses remote code it was not allowed
        refused = type(exc).__name__
    arch, tensors = import_hf(out)
    back = build_engine(load_config(None, [*arch, "parallel.world_size=1"]), 6,
                        torch.device("cpu"), with_optimizer=False, ddp=False)
    load_global_into(back.modules, tensors)
    load_router_buffers(back.modules, tensors)
    with torch.no_grad():
        again = back.modules[0].eval()(images)
    return {"err": (ours - theirs).abs().max().item(), "scale": ours.abs().max().item(),
            "perturbed": (ours - perturbed).abs().max().item(), "refused": refused,
            "import_err": (ours - again).abs().max().item()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_vit_export_loads_in_transformers(name, tmp_path):
    r = run_distributed(export_task, 1, str(tmp_path / "hf"), CASES[name])[0]
    assert r["scale"] > 0.1, r
    assert r["err"] <= 1e-4, r
    assert r["perturbed"] > 1e-3, r
    assert r["refused"] is not None, r
    assert r["import_err"] <= 1e-6, r
