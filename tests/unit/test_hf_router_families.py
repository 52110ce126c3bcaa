"""Every router family through the remote-code Hugging Face export (model_type "megamoe").

For each family a tiny megamoe model with that router (synthetic routing context where the
family reads one) gets random values in every parameter and router buffer (adaLN-zero layers,
a non-zero loss-free selection bias, an Expert Race threshold inside the score range), is
exported, loaded by transformers with trust_remote_code, and its logits equal megamoe's
eval-mode logits on the same batch within 1e-4. Controls: zeroing the selection bias, the
race threshold (in the folder), DiffMoE's thresholds, the Diff-MoE calibration, shifting the
timesteps, or dropping V-MoE's eval capacity, or moving the experts of one layer moves the
logits by far more; the families that choose over the batch (eval capacity, expert choice)
route one sample alone differently, as megamoe does, while Soft MoE (slots per input
sequence) and DiffMoE (a threshold per token) give a sample alone its in-batch logits; a folder
exported before that rule (no `soft_moe_groups`) is refused on
import. Export → import → export is the identity
for Diff-MoE, Expert Race and Soft MoE, and the imported tensors (router buffers included)
give megamoe the same logits; `megamoe convert` carries the race threshold both ways. Greedy
decoding with the KV cache equals recomputation for the context-routed families (the synthetic
timestep comes from the whole sequence). The modality ids and timesteps can be passed
explicitly; without them and without a synthetic rule the model raises; an export whose tensors
lack a router buffer is refused.
"""

import functools
import json
import os
import shutil

import pytest
import torch

from megamoe.testing.hf import (
    TOL, build_tiny, context_logits_BSV, convert_both_ways, copy_with_config, export_engine,
    hf_logits_err, load_hf, load_imported, max_abs_diff, randomize, reexport, sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB, tiny_config
from megamoe.testing.pool import run_distributed

NO_AUX = ["model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"]
NON_CAUSAL = ["model.moe.allow_non_causal=true"]
FAMILIES = {
    "topk_bias": ["model.moe.loss_free_bias_rate=0.001"],
    "dit_moe": ["model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=48"],
    "diff_moe": ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8",
                 "data.synthetic_timesteps=true", "model.moe.loss_free_bias_rate=0.001"],
    "moee": ["model.moe.router=moee", "model.moe.topk=4"],
    "vmoe": ["model.moe.router=vmoe", *NO_AUX, *NON_CAUSAL, "model.moe.vmoe.capacity_ratio=null",
             "model.moe.vmoe.eval_capacity_ratio=0.5", "model.moe.vmoe.priority=max"],
    "limoe": ["model.moe.router=limoe", *NO_AUX, "data.synthetic_modalities=2",
              "model.moe.vmoe.capacity_ratio=null"],
    "expert_choice": ["model.moe.router=expert_choice", *NO_AUX, *NON_CAUSAL],
    "race": ["model.moe.router=race", *NO_AUX, *NON_CAUSAL, "model.moe.layer_freq=[1,0,1,1]"],
    "modality_vlmo": ["model.moe.router=modality", *NO_AUX, "data.synthetic_modalities=3",
                      "model.moe.modality.num_modalities=3", "model.moe.modality.vl_ffn_layers=1"],
    "modality_pools": ["model.moe.router=modality", *NO_AUX, "data.synthetic_modalities=2",
                       "model.moe.modality.mode=pools"],
    "soft": ["model.moe.router=soft", *NON_CAUSAL, "model.moe.soft.slots_per_expert=4"],
    "diffmoe": ["model.moe.router=diffmoe", *NO_AUX, *NON_CAUSAL, "model.moe.topk=1"],
}
ROUND_TRIP = ("diff_moe", "race", "soft")
BATCH_DEPENDENT = ("vmoe", "expert_choice")   # choose over the call's B·S tokens
BATCH_INDEPENDENT = ("soft", "diffmoe")       # choose within each sample / per token
RACE_THRESHOLD = 0.3         # inside the identity scores' range (std ≈ 0.6)


def _gates(hf):
    return [layer.mlp.gate for layer in hf.model.layers if layer.is_moe]


@torch.no_grad()
def _controls(name, hf, ours, tokens_BS, out):
    """(name, max |Δ logits|, whether it must differ): edits that must move the logits, and
    explicit routing context that must give the synthetic context's logits."""
    gates = _gates(hf)
    if name in BATCH_DEPENDENT + BATCH_INDEPENDENT:    # sample 0 alone: another group or not
        alone = hf(input_ids=tokens_BS[:1], use_cache=False).logits
        yield "sample_alone", (alone - ours[:1]).abs().max().item(), name in BATCH_DEPENDENT
    experts = next(layer.mlp.experts for layer in hf.model.layers if layer.is_moe)
    saved = experts.down_proj.clone()
    experts.down_proj.copy_(saved.roll(1, dims=0))       # experts away from their routes
    yield "experts_rolled", hf_logits_err(hf, ours, tokens_BS), True
    experts.down_proj.copy_(saved)
    if name in ("topk_bias", "diff_moe"):
        saved = [g.selection_bias.clone() for g in gates]
        for g in gates:
            g.selection_bias.zero_()
        yield "no_selection_bias", hf_logits_err(hf, ours, tokens_BS), True
        for g, s in zip(gates, saved):
            g.selection_bias.copy_(s)
    if name == "diff_moe":
        from megamoe.data.synthetic_context import timesteps

        t_B = timesteps(tokens_BS)
        yield "explicit_timesteps", hf_logits_err(hf, ours, tokens_BS, timesteps=t_B), False
        yield "shifted_timesteps", hf_logits_err(hf, ours, tokens_BS, timesteps=t_B + 100), True
        for g in gates:
            g.calibration.adaln_zero_bias.zero_()
            g.calibration.adaln_zero_weight.zero_()
        yield "no_calibration", hf_logits_err(hf, ours, tokens_BS), True
        from transformers import GenerationMixin

        hf.prepare_inputs_for_generation = functools.partial(   # timestep of the new token
            GenerationMixin.prepare_inputs_for_generation, hf)
        yield "decoding_without_prefix_timestep", _cached_decoding_err(hf, tokens_BS[:, :6]), True
        del hf.prepare_inputs_for_generation
    if name == "vmoe":
        for g in gates:
            g.ratio = None
        yield "no_eval_capacity", hf_logits_err(hf, ours, tokens_BS), True
    if name == "race":                       # the threshold zeroed in the folder itself
        from safetensors.torch import load_file, save_file

        copy = out + "-nothreshold"
        shutil.copytree(out, copy)
        path = os.path.join(copy, "model.safetensors")
        tensors = load_file(path)
        for key in [k for k in tensors if k.endswith("gate.threshold_ema")]:
            tensors[key].zero_()
        save_file(tensors, path, metadata={"format": "pt"})
        yield "no_threshold", hf_logits_err(load_hf(copy)[0], ours, tokens_BS), True
        shutil.rmtree(copy)
    if name == "diffmoe":                    # τ = 0: every (token, expert) pair routed
        for g in gates:
            g.expert_threshold.zero_()
        yield "no_threshold", hf_logits_err(hf, ours, tokens_BS), True
    if name == "modality_pools":
        ids_BS = tokens_BS % 2
        yield ("explicit_modality_ids", hf_logits_err(hf, ours, tokens_BS, modality_ids=ids_BS),
               False)
        yield ("other_modality_ids",
               hf_logits_err(hf, ours, tokens_BS, modality_ids=1 - ids_BS), True)


@torch.no_grad()
def _vmoe_batch_order(hf, engine, cfg, tokens_BS):
    """(check, (max |Δ logits|, must differ)) with V-MoE's eval capacity and no priority in
    both models: buffers filled in batch order (sample by sample) agree; the HF router told
    the call is one sample (Megatron's position-major order) moves the logits."""
    import dataclasses

    from megamoe.models.lm.model import moe_layers

    routers, gates = [layer.router for layer in moe_layers(engine.modules)], _gates(hf)
    for module in routers + gates:
        module.priority = "none"
    ours = context_logits_BSV(engine, cfg, tokens_BS)
    yield "priority_none", (hf_logits_err(hf, ours, tokens_BS), False)
    for g in gates:
        g.forward = functools.partial(
            lambda g, x_TD, ctx: type(g).forward(g, x_TD, dataclasses.replace(ctx, batch=1)), g)
    yield "priority_none_megatron_order", (hf_logits_err(hf, ours, tokens_BS), True)
    for module in routers + gates:
        module.priority = "max"
        module.__dict__.pop("forward", None)


@torch.no_grad()
def _cached_decoding_err(model, prompt_BS, steps: int = 4) -> float:
    """max |Δ| between the logits of greedy decoding with the KV cache (only the new token is
    fed) and the logits of recomputing each whole prefix."""
    out = model.generate(prompt_BS, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    S = prompt_BS.shape[1]
    err = 0.0
    for i, logits_BV in enumerate(out.logits):
        full_BV = model(out.sequences[:, :S + i], use_cache=False).logits[:, -1]
        err = max(err, (logits_BV - full_BV).abs().max().item())
    return err


def family_task(root):
    """Every family: export, load with transformers, compare; controls and round trips."""
    from megamoe.checkpoint.hf import family_for

    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    results = {}
    for name, overrides in FAMILIES.items():
        cfg, engine = build_tiny(overrides)
        randomize(engine, race_threshold=RACE_THRESHOLD)
        out = os.path.join(root, name)
        tensors = export_engine(engine, cfg, out)
        ours = context_logits_BSV(engine, cfg, tokens_BS)
        hf, not_loaded = load_hf(out)
        r = {"family": family_for(cfg).MODEL_TYPE, "err": hf_logits_err(hf, ours, tokens_BS),
             "scale": ours.abs().max().item(), "not_loaded": not_loaded}
        if name in ("diff_moe", "modality_pools", "race"):   # synthetic context, buffers
            r["decode_err"] = _cached_decoding_err(hf, tokens_BS[:, :6])
        if name == "vmoe":
            r["batch_order"] = dict(_vmoe_batch_order(hf, engine, cfg, tokens_BS))
        r["controls"] = {c: (err, differ) for c, err, differ    # edits hf: last
                         in _controls(name, hf, ours, tokens_BS, out)}
        if name in ROUND_TRIP:
            checks, hf_overrides, back = reexport(out, tensors)
            r.update(checks)
            cfg2, engine2, r["buffers_loaded"] = load_imported(hf_overrides, back)
            r["import_err"] = max_abs_diff(context_logits_BSV(engine2, cfg2, tokens_BS), ours)
        results[name] = r
    return results


def convert_task(root):
    """`megamoe convert` both ways on a checkpoint of an Expert Race model: τ_ema (a router
    buffer) reaches the folder and comes back into the imported step-0 checkpoint."""
    from megamoe.models.lm.model import moe_layers

    cfg, engine = build_tiny(FAMILIES["race"])
    randomize(engine, race_threshold=RACE_THRESHOLD)
    engine2 = convert_both_ways(engine, cfg, root, lambda: build_tiny(FAMILIES["race"]))
    return [layer.router.threshold_ema.item() for layer in moe_layers(engine2.modules)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("router_families"))
    return root, run_distributed(family_task, 1, root)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_logits_equal_megamoe_eval_logits(name, results):
    r = results[1][name]
    assert r["family"] == "megamoe" and r["not_loaded"] == {}
    assert r["scale"] > 0.1
    assert r["err"] < TOL, r["err"]
    for control, (err, differ) in {**r["controls"], **r.get("batch_order", {})}.items():
        assert err > 100 * TOL if differ else err < TOL, (control, err)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_export_import_export_is_the_identity(name, results):
    r = results[1][name]
    assert r["import_same"] and r["reexport_same"] and r["same_config.json"]
    assert r["import_err"] < 1e-6, r["import_err"]
    if name == "race":
        assert r["buffers_loaded"] == 3 * 2      # threshold_ema, threshold_updates × 3 layers


@pytest.mark.timeout(300)
def test_convert_carries_router_buffers_both_ways(tmp_path):
    thresholds = run_distributed(convert_task, 1, str(tmp_path))[0]
    assert thresholds == pytest.approx([RACE_THRESHOLD] * 3)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["diff_moe", "modality_pools", "race"])
def test_kv_cache_decoding_equals_recompute_with_synthetic_context(name, results):
    assert results[1][name]["decode_err"] < TOL


@pytest.mark.timeout(300)
def test_folder_records_router_state_and_context(results):
    root = results[0]
    from safetensors.torch import load_file

    race = load_file(os.path.join(root, "race", "model.safetensors"))
    assert race["model.layers.0.mlp.gate.threshold_ema"].item() == pytest.approx(RACE_THRESHOLD)
    assert "model.layers.1.mlp.gate.threshold_ema" not in race      # a dense layer
    bias = load_file(os.path.join(root, "topk_bias", "model.safetensors"))
    assert bias["model.layers.0.mlp.gate.selection_bias"].abs().max() > 0
    with open(os.path.join(root, "diff_moe", "config.json")) as f:
        config = json.load(f)
    assert config["router"] == "diff_moe" and config["norm_topk_prob"] is False
    assert config["routing_context"] == {"synthetic_modalities": 0, "synthetic_timesteps": True}
    assert config["router_options"] == {"diff_moe": {"calibration_rank": 8}}
    assert "routers_megamoe.py" in os.listdir(os.path.join(root, "diff_moe"))


def test_export_refuses_tensors_without_the_router_buffers(results, tmp_path):
    """A folder without them would load zeros silently: the export names the missing buffer."""
    from megamoe.checkpoint.hf import export_hf, import_hf

    _, tensors = import_hf(os.path.join(results[0], "race"))
    tensors = {k: v for k, v in tensors.items() if "threshold" not in k}
    cfg = tiny_config(FAMILIES["race"])
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.router\.threshold_ema"):
        export_hf(tensors, cfg, str(tmp_path / "out"))


@pytest.mark.timeout(300)
def test_missing_context_without_a_synthetic_rule_raises(results, tmp_path):
    for name, kwarg in (("modality_pools", "modality_ids"), ("diff_moe", "timesteps")):
        copy = copy_with_config(
            os.path.join(results[0], name), tmp_path / name,
            {"routing_context": {"synthetic_modalities": 0, "synthetic_timesteps": False}})
        hf, _ = load_hf(copy)
        with pytest.raises(ValueError, match=kwarg):
            hf(input_ids=sample_tokens_BS(TINY_VOCAB))


def test_mixture_of_recursions_recipe_exports_as_remote_code():
    """MoR models export with the remote code (logits: test_hf_mor.py), never as Mixtral."""
    from megamoe.checkpoint import hf_mixtral
    from megamoe.checkpoint.hf import family_for
    from megamoe.config import load_config

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "mor_token.yaml")
    cfg = load_config(recipe, ["parallel.world_size=1", "parallel.expert=1"])
    assert family_for(cfg).MODEL_TYPE == "megamoe"
    assert any(p.startswith("model.mor.enabled:") for p in hf_mixtral.problems(cfg))


def test_soft_moe_folder_of_the_old_rule_is_refused(results, tmp_path):
    """Exported before Soft MoE's slots became per sequence (config.json without
    `soft_moe_groups`): megamoe's import and the remote code refuse it naming the field."""
    from megamoe.checkpoint.hf import import_hf
    from megamoe.checkpoint.hf_megamoe import read_config

    src = os.path.join(results[0], "soft")
    assert read_config(src).soft_moe_groups == "sequence"          # the new folder passes
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    del config["soft_moe_groups"]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    with open(old / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="config.json: soft_moe_groups: .*per input sequence"):
        import_hf(str(old))
    with pytest.raises(ValueError, match="soft_moe_groups"):
        load_hf(str(old))
