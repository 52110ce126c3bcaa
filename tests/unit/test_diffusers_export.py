"""The dit family's diffusers export (`megamoe convert RUN --to diffusers`): a tiny DiT (dense
with DDPM, DiT-MoE with rectified flow) saved as a checkpoint on one process and exported from
it; `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` loads the folder offline in
a subprocess that cannot import megamoe (checked), where the transformer's output equals
megamoe's `predict` (EMA weights) and the pipeline's samples equal megamoe's sampler
(megamoe.models.dit.sample) for the same seed and guidance scale, within 1e-5 before uint8.
The pipeline's `save_pretrained` writes a folder that loads the same way. Negative controls:
loading without trust_remote_code is refused by diffusers, a perturbed weight breaks the
equality, and the trained (non-EMA) weights differ from what was exported.
The other routers of the dit recipes (DiffMoE, EC-DiT's per-image expert choice, Race,
Diff-MoE) are checked on the transformer's output alone, in the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from megamoe.testing.pool import run_distributed

TOL = 1e-5
LABELS, STEPS, CFG_SCALE, SEED = [1, 4, 6, 0], 3, 2.0, 5
CASES = {
    "dense_ddpm": (["model.moe.num_experts=0", "model.moe.router=topk",
                    "model.moe.shared_expert_ffn_hidden_size=0", "model.dit.objective=ddpm"],
                   "blocks.0.ffn.fc1.weight"),
    "dit_moe": ([], "blocks.1.ffn.experts.fc1_weight"),
}
ROUTER_CASES = {
    "diffmoe": ["model.moe.router=diffmoe", "model.moe.topk=1", "model.moe.aux_loss_coeff=0"],
    "ec_dit": ["model.moe.router=expert_choice", "model.moe.topk=1",
               "model.moe.expert_choice.selection_group=sequence",
               "model.moe.aux_loss_coeff=0"],
    "race": ["model.moe.router=race", "model.moe.race.plr_coeff=0",
             "model.moe.aux_loss_coeff=0"],
    "race_plr": ["model.moe.router=race", "model.moe.race.plr_coeff=0.1",
                 "model.moe.aux_loss_coeff=0"],
    "diff_moe": ["model.moe.router=diff_moe"],
    "diffmoe_pool_topk": ["model.moe.router=diffmoe", "model.moe.topk=1",
                          "model.moe.aux_loss_coeff=0", "model.moe.diffmoe.inference=pool_topk"],
    "dit_moe_capacity": ["model.moe.capacity_factor=0.5", "model.moe.allow_non_causal=true"],
}

# run with `python -I -S`: no site-packages .pth files (megamoe's editable install), no cwd;
# argv: site-packages, then (pipeline folder, reference file) per case; prints {case: figures}
LOADER = r"""
import json, os, sys
sys.path.append(sys.argv[1])
import torch
try:
    import megamoe
    where = megamoe.__file__
except ImportError:
    where = None
from diffusers import DiffusionPipeline
results = {}
for out, ref_path in zip(sys.argv[2::2], sys.argv[3::2]):
    r = results[os.path.basename(os.path.dirname(out))] = {"megamoe": where}
    try:
        DiffusionPipeline.from_pretrained(out, local_files_only=True)
        r["refused"] = None
    except ValueError as exc:
        r["refused"] = str(exc)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = torch.load(ref_path)
    with torch.no_grad():
        pred = pipe.transformer(ref["x"], ref["t"], ref["y"]).sample
    r["pred_err"] = (pred - ref["pred"]).abs().max().item()
    r["ema_gap"] = (pred - ref["trained"]).abs().max().item()
    images = pipe(ref["labels"], num_inference_steps=ref["steps"], guidance_scale=ref["cfg"],
                  seed=ref["seed"], output_type="pt").images
    r["sample_err"] = (images - ref["images"]).abs().max().item()
    r["sample_std"] = images.std().item()
    r["pil"] = len(pipe(ref["labels"][:1], num_inference_steps=1, seed=0).images)
    drawn = pipe(ref["labels"], num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    r["generator_ok"] = bool(torch.isfinite(drawn).all()) and drawn.shape == images.shape
    pipe.save_pretrained(out + "_resaved")
    again = DiffusionPipeline.from_pretrained(out + "_resaved", trust_remote_code=True,
                                              local_files_only=True)
    with torch.no_grad():
        r["resaved_err"] = (again.transformer(ref["x"], ref["t"], ref["y"]).sample
                            - ref["pred"]).abs().max().item()
        dict(pipe.transformer.named_parameters())[ref["perturb"]].view(-1)[:8].add_(0.5)
        r["perturbed_err"] = (pipe.transformer(ref["x"], ref["t"], ref["y"]).sample
                              - ref["pred"]).abs().max().item()
print(json.dumps(results))
"""


def _tiny_engine(overrides, seed: int = 3):
    """(cfg, engine) of TINY_DIT + overrides on one process, with weights far from the
    adaLN-Zero start and an EMA different from them (EMA = one draw, weights = another)."""
    from megamoe.engines.megatron import build_engine
    from megamoe.testing.dit import TINY_DIT
    from megamoe.testing.parity import tiny_config

    cfg = tiny_config(["parallel.world_size=1", *TINY_DIT, *overrides])
    engine = build_engine(cfg, cfg.data.num_classes, torch.device("cpu"), with_optimizer=False,
                          ddp=False)
    model = engine.modules[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.ema.reset()
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if hasattr(m, "expert_threshold"):      # DiffMoE: inside σ(p)'s range
                m.expert_threshold.fill_(0.5)
            if hasattr(m, "threshold_ema"):         # Race: some pairs routed, not all
                m.threshold_ema.fill_(0.3)
    return cfg, engine, g


def _inputs(g, cfg, B: int = 4):
    side = cfg.data.image_size
    return (torch.randn(B, 3, side, side, generator=g), torch.tensor([10.0, 500.0, 999.0, 250.0]),
            torch.tensor([0, 3, cfg.data.num_classes, 2]))


def export_task(root: str, overrides, perturb: str) -> dict:
    """Save the tiny DiT as a checkpoint, export it with `megamoe convert`'s function and write
    megamoe's reference outputs next to the folder."""
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.commands.convert import to_diffusers
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.dit.model import predict
    from megamoe.models.dit.sample import sample_images

    cfg, engine, g = _tiny_engine(overrides)
    cfg.run.dir = root
    save_checkpoint(os.path.join(root, "checkpoints"), engine,
                    {"vocab_size": cfg.data.num_classes}, config=cfg)
    out = os.path.join(root, "pipe")
    to_diffusers(root, out, log=lambda *_: None)
    x, t, y = _inputs(g, cfg)
    with ema_weights(engine.modules):
        pred = predict(engine.modules, x, t, y)
    images = sample_images(engine.modules, cfg, LABELS, steps=STEPS, cfg_scale=CFG_SCALE,
                           seed=SEED)
    torch.save({"x": x, "t": t, "y": y, "pred": pred, "trained": predict(engine.modules, x, t, y),
                "labels": LABELS, "steps": STEPS, "cfg": CFG_SCALE, "seed": SEED,
                "images": images, "perturb": perturb}, os.path.join(root, "ref.pt"))
    return {"out": out, "scale": pred.abs().max().item(), "files": sorted(os.listdir(out))}


def export_cases_task(root: str) -> dict:
    """export_task for every case of CASES, each in root/<case>."""
    return {name: export_task(os.path.join(root, name), overrides, perturb)
            for name, (overrides, perturb) in CASES.items()}


@pytest.mark.timeout(300)
def test_pipeline_loads_without_megamoe_and_samples_as_megamoe(tmp_path):
    made = run_distributed(export_cases_task, 1, str(tmp_path))[0]
    args = []
    for name, m in made.items():
        assert m["files"] == ["model_index.json", "pipeline.py", "scheduler", "transformer"], m
        assert m["scale"] > 0.1, m
        args += [m["out"], str(tmp_path / name / "ref.pt")]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    loader = tmp_path / "load.py"
    loader.write_text(LOADER)
    proc = subprocess.run([sys.executable, "-I", "-S", str(loader),
                           sysconfig.get_paths()["purelib"], *args],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(CASES), results
    for name, r in results.items():
        assert r["megamoe"] is None, (name, r)                # the folder runs without megamoe
        assert r["refused"] and "trust_remote_code" in r["refused"], (name, r)
        assert r["pred_err"] <= TOL, (name, r)
        assert r["sample_err"] <= TOL and r["sample_std"] > 0.05, (name, r)
        assert r["pil"] == 1 and r["generator_ok"], (name, r)
        assert r["resaved_err"] <= TOL, (name, r)            # save_pretrained carries the code
        assert r["perturbed_err"] > 1e-3, (name, r)          # negative control
        assert r["ema_gap"] > 1e-3, (name, r)                # the EMA was exported


def routers_task(root: str) -> dict:
    """Per router case: max |transformer − megamoe's predict| on a batch of 4, and for one
    image alone (batch-independent routers route it as in the batch; the folder's code too)."""
    from diffusers import DiffusionPipeline

    from megamoe.checkpoint.diffusers_export import ema_tensors, export_diffusers
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.dit.model import predict

    results = {}
    for name, overrides in ROUTER_CASES.items():
        cfg, engine, g = _tiny_engine(overrides)
        out = os.path.join(root, name)
        export_diffusers(ema_tensors(engine.modules), cfg, out)
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True,
                                                 local_files_only=True)
        x, t, y = _inputs(g, cfg)
        with ema_weights(engine.modules):
            ours = predict(engine.modules, x, t, y)
        maps = []
        gate = pipe.transformer.blocks[1].ffn.gate
        hook = gate.register_forward_hook(lambda _m, _a, out: maps.append(out[1]))
        with torch.no_grad():
            theirs = pipe.transformer(x, t, y).sample
            hook.remove()
            alone = pipe.transformer(x[1:2], t[1:2], y[1:2]).sample
            for block in pipe.transformer.blocks:     # control: EC over the whole call
                if block.is_moe:
                    block.ffn.per_image = False
            pooled = pipe.transformer(x, t, y).sample
            gates = [b.ffn.gate for b in pipe.transformer.blocks if b.is_moe]
            no_plr = None
            if getattr(gates[0], "plr_hidden", None) is not None:   # control: logits W·x
                for gate in gates:
                    gate.plr_hidden = None
                no_plr = (ours - pipe.transformer(x, t, y).sample).abs().max().item()
        results[name] = {"err": (ours - theirs).abs().max().item(),
                         "scale": ours.abs().max().item(),
                         "alone": (alone - theirs[1:2]).abs().max().item(),
                         "routed": torch.cat(maps).float().mean().item(),
                         "pooled": (ours - pooled).abs().max().item(), "no_plr": no_plr}
    return results


@pytest.mark.timeout(300)
def test_other_dit_routers_match_megamoe(tmp_path):
    r = run_distributed(routers_task, 1, str(tmp_path))[0]
    for name, v in r.items():
        assert v["scale"] > 0.1 and v["err"] <= TOL, (name, v)
        assert 0 < v["routed"] < 1, (name, v)                 # some (token, expert) pairs
    assert r["ec_dit"]["alone"] <= TOL, r                     # per image: batch-independent
    assert r["ec_dit"]["pooled"] > 1e-3, r                    # control: selection over the call
    # Race's PLR: the exported router reads its hidden layer W_h (without it: other logits)
    assert r["race_plr"]["no_plr"] > 1e-3 and r["race"]["no_plr"] is None, r


def test_unsupported_settings_are_refused_by_field():
    from megamoe.checkpoint.diffusers_export import problems
    from megamoe.testing.dit import TINY_DIT
    from megamoe.testing.parity import tiny_config

    cfg = tiny_config(["parallel.world_size=1", *TINY_DIT, "model.moe.router=expert_choice",
                       "model.moe.topk=1", "model.moe.aux_loss_coeff=0",
                       "model.moe.expert_choice.selection_group=data-parallel"])
    bad = problems(cfg)
    assert len(bad) == 1 and bad[0].startswith("model.moe.expert_choice.selection_group:"), bad
    assert problems(tiny_config(["parallel.world_size=1", *TINY_DIT])) == []


def test_cli_errors_are_one_line(tmp_path, capsys):
    """`megamoe convert SRC --to diffusers --out OUT`: the output folder given twice, or a
    missing source, is one error line before anything loads."""
    from megamoe.cli import main

    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "a"), "--to", "diffusers",
                 "--out", str(tmp_path / "b")]) == 2
    assert "give the output folder once" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "none"), "--to", "diffusers",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint directory" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
