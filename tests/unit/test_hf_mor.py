"""Mixture-of-Recursions models through the remote-code Hugging Face export (model_type
"megamoe", hf_remote/mor_megamoe.py).

Each case is a tiny MoR model (hidden 32, S = 16, 4-expert top-2 MoE FFNs in the shared pool,
loss-free MoE selection bias where noted) with random values in every parameter and router
buffer. transformers' logits (trust_remote_code) equal megamoe's eval-mode logits within 1e-4,
and both run the same tokens at every recursion step (kept counts compared; with the σ > 0.5
rule they are neither all nor none of the candidates, so a wrong eval rule shows). Controls on
the loaded HF model must move the logits by > 100× the tolerance: a perturbed shared-pool weight,
the other expert-choice inference rule, KV sharing switched, the other gating, the loss-free
depth bias zeroed. The folder has ≥ 2 shards; export → import → export is the identity (tensors
and config.json); the imported megamoe model gives the same logits on one rank, under EP2 and
under TP2 + SP (rolled experts fail that); `megamoe convert` carries the token-choice depth bias and the MoE
selection biases of the pool both ways; greedy generation (no KV cache) equals recomputation.
"""

import json
import os

import pytest
import torch

from megamoe.testing.hf import (
    SHARD_BYTES, TOL, build_tiny, convert_both_ways, copy_with_config, export_engine,
    greedy_matches_recompute, hf_logits_err, imported_errors, load_hf, load_imported, max_abs_diff,
    megamoe_logits_BSV, randomize, reexport, sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB, tiny_config
from megamoe.testing.pool import run_distributed

EXPERT = ["model.mor.router=expert", "model.mor.allow_non_causal=true"]
TOKEN = ["model.mor.router=token"]
MOE_BIAS = ["model.moe.loss_free_bias_rate=0.001"]
CASES = {
    # Middle-Cycle L = 8 (1 + 2·3 + 1), σ > 0.5, sigmoid MoE scores with a selection bias
    "expert_threshold": ["model.num_layers=8", *EXPERT, *MOE_BIAS,
                         "model.moe.score_function=sigmoid"],
    # the official eval path, with KV sharing, Middle-Sequence, temperature 2, C = 1, 1/2, 1/4
    "expert_topk_kv": ["model.num_layers=8", *EXPERT, "model.mor.inference_rule=topk",
                       "model.mor.kv_sharing=true", "model.mor.sharing=middle_sequence",
                       "model.mor.temperature=2.0", "model.mor.capacities=[1.0,0.5,0.25]"],
    "expert_topk": ["model.num_layers=8", *EXPERT, "model.mor.inference_rule=topk"],
    # Cycle L = 6, σ > 0.5 with KV sharing (step 0 keeps every token), additive gating
    "expert_threshold_kv_cycle": ["model.num_layers=6", *EXPERT, "model.mor.sharing=cycle",
                                  "model.mor.kv_sharing=true", "model.mor.gating=additive"],
    # loss-free depth bias; MoE and dense slots (unique layers MoE/dense, pool MoE/dense)
    "token_loss_free": ["model.num_layers=8", *TOKEN, *MOE_BIAS,
                        "model.mor.token.balancing=loss_free",
                        "model.moe.layer_freq=[1,1,0,1,0,1,0,0]"],
    # Sequence L = 6 (steps use slots 00, 01, 11), sigmoid depth scores, additive, KV sharing
    "token_sequence_kv": ["model.num_layers=6", *TOKEN, "model.mor.sharing=sequence",
                          "model.mor.token.score=sigmoid", "model.mor.gating=additive",
                          "model.mor.kv_sharing=true"],
}
THRESHOLD = ("expert_threshold", "expert_threshold_kv_cycle")
EP2_CASES = ("expert_threshold", "token_loss_free")
DEPTH_BIAS = torch.tensor([0.02, -0.01, 0.0])       # loss-free b: moves some depths, not all


def _build(overrides):
    """A tiny MoR model (3 recursions) on one rank."""
    return build_tiny(["model.mor.enabled=true", "model.mor.num_recursions=3", *overrides])


@torch.no_grad()
def _randomize(engine, name):
    """`randomize`, and the token-choice depth bias non-zero (under `balancing: loss` both
    sides must ignore it). Cycle + σ > 0.5 + KV sharing: the embeddings share a direction u
    and θ_1 = 2u, so that step 0 keeps every token (KV sharing needs it) while later steps
    drop some."""
    from megamoe.mor.decoder import mor_decoders

    g = randomize(engine)
    model = engine.modules[0]
    router = mor_decoders(engine.modules)[0].recursion.router
    if hasattr(router, "router_bias"):
        router.router_bias.copy_(DEPTH_BIAS)
    if name == "expert_threshold_kv_cycle":
        u = torch.nn.functional.normalize(torch.randn(router.routers[0].weight.shape[1],
                                                      generator=g), dim=0)
        model.embedding.word_embeddings.weight.add_(u)
        router.routers[0].weight.copy_(2.0 * u[None])


@torch.no_grad()
def _megamoe_eval(engine, tokens_BS):
    """megamoe's eval-mode logits and the recursion block's kept fractions per step."""
    from megamoe.mor.decoder import mor_decoders

    logits = megamoe_logits_BSV(engine, tokens_BS)
    return logits, dict(mor_decoders(engine.modules)[0].recursion.last_stats)


def _hf_stats(hf, token_choice: bool, total: int) -> dict:
    """The HF recursion's counts as megamoe's `last_stats` (kept share / depth share of the
    `total` = B·S tokens)."""
    kept = [int(k.sum()) for k in hf.model.recursion.last_kept]
    if token_choice:               # depth i: run step i but not step i + 1
        return {f"depth_{i}_fraction": (kept[i] - (kept[i + 1] if i + 1 < len(kept) else 0))
                / total for i in range(len(kept))}
    return {f"step_{r}_kept_fraction": k / total for r, k in enumerate(kept)}


@torch.no_grad()
def _controls(name, hf, ours, tokens_BS):
    """(control, max |Δ logits|): edits of the loaded HF model that must move the logits."""
    rec = hf.model.recursion
    w = rec.layers[0].self_attn.o_proj.weight
    saved = w.clone()
    w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(9)))
    yield "pool_weight", hf_logits_err(hf, ours, tokens_BS)
    w.copy_(saved)
    if name.startswith("expert"):
        rule = rec.router.rule
        if not (rec.kv_sharing and rule == "topk"):       # threshold may drop step-0 tokens
            rec.router.rule = "topk" if rule == "threshold" else "threshold"
            yield "other_inference_rule", hf_logits_err(hf, ours, tokens_BS)
            rec.router.rule = rule
        else:
            rec.kv_sharing = False
            yield "no_kv_sharing", hf_logits_err(hf, ours, tokens_BS)
            rec.kv_sharing = True
    if name == "expert_topk":
        rec.kv_sharing = True
        yield "kv_sharing", hf_logits_err(hf, ours, tokens_BS)
        rec.kv_sharing = False
    if name == "token_sequence_kv":
        rec.kv_sharing = False
        yield "no_kv_sharing", hf_logits_err(hf, ours, tokens_BS)
        rec.kv_sharing = True
    gating = rec.gating
    rec.gating = "additive" if gating == "weighted" else "weighted"
    yield "other_gating", hf_logits_err(hf, ours, tokens_BS)
    rec.gating = gating
    if name == "token_loss_free":
        rec.router.router_bias.zero_()
        yield "no_depth_bias", hf_logits_err(hf, ours, tokens_BS)
        rec.router.router_bias.copy_(DEPTH_BIAS)


def mor_task(root):
    """Every case: export, load with transformers, compare, controls, round trip."""
    from megamoe.checkpoint.hf import family_for

    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    results = {}
    for name, overrides in CASES.items():
        cfg, engine = _build(overrides)
        _randomize(engine, name)
        out = os.path.join(root, name)
        tensors = export_engine(engine, cfg, out, max_shard_bytes=SHARD_BYTES)
        ours, stats = _megamoe_eval(engine, tokens_BS)
        hf, not_loaded = load_hf(out)
        token = name.startswith("token")
        r = {"family": family_for(cfg).MODEL_TYPE, "not_loaded": not_loaded,
             "err": hf_logits_err(hf, ours, tokens_BS), "scale": ours.abs().max().item(),
             "stats": stats, "hf_stats": _hf_stats(hf, token, tokens_BS.numel()),
             "kept": [k.tolist() for k in hf.model.recursion.last_kept]}
        if name == "token_loss_free":
            r["greedy"] = greedy_matches_recompute(hf, tokens_BS[:, :6], steps=3)
        r["controls"] = dict(_controls(name, hf, ours, tokens_BS))
        checks, hf_overrides, back = reexport(
            out, tensors, files=("config.json", "model.safetensors.index.json"),
            max_shard_bytes=SHARD_BYTES)
        r.update(checks)
        _, engine2, r["buffers_loaded"] = load_imported(hf_overrides, back, build=_build)
        r["import_err"] = max_abs_diff(_megamoe_eval(engine2, tokens_BS)[0], ours)
        r["ours"] = ours
        results[name] = r
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mor_export"))
    return root, run_distributed(mor_task, 1, root, timeout_s=600)[0]


# ---- export ------------------------------------------------------------------------------------

@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_logits_equal_megamoe_eval_logits(name, results):
    r = results[1][name]
    assert r["family"] == "megamoe" and r["not_loaded"] == {}
    assert r["scale"] > 0.1
    assert r["err"] < TOL, r["err"]
    assert r["hf_stats"] == pytest.approx(r["stats"], abs=1e-9)   # the same tokens per step
    for control, err in r["controls"].items():
        assert err > 100 * TOL, (control, err)
    print(f"{name}: max |Δ| {r['err']:.2e}, kept {r['kept']}, controls "
          + ", ".join(f"{c} {e:.2e}" for c, e in r["controls"].items()))


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", THRESHOLD)
def test_threshold_rule_drops_some_candidates(name, results):
    """σ > 0.5 keeps a strict, non-empty subset of the candidates at some step, so running the
    top-k rule (or keeping everyone) would give other logits."""
    kept = [sum(k) for k in results[1][name]["kept"]]
    candidates = [32, *kept[:-1]]                  # B·S, then the previous step's kept tokens
    assert any(0 < k < c for k, c in zip(kept, candidates)), kept
    if "kv" in name:
        assert kept[0] == 32                       # KV sharing: step 0 keeps every token


@pytest.mark.timeout(700)
def test_token_choice_uses_several_depths(results):
    for name in ("token_loss_free", "token_sequence_kv"):
        depths = [v for k, v in results[1][name]["stats"].items() if k.startswith("depth_")]
        assert sum(v > 0 for v in depths) >= 2, (name, depths)


@pytest.mark.timeout(700)
def test_folder_has_shards_mor_config_and_router_tensors(results):
    from megamoe.checkpoint.hf import read_safetensors

    root = results[0]
    for name in CASES:
        shards = [f for f in os.listdir(os.path.join(root, name)) if f.endswith(".safetensors")]
        assert len(shards) >= 2, (name, shards)
    with open(os.path.join(root, "expert_topk_kv", "config.json")) as f:
        config = json.load(f)
    assert config["use_cache"] is False and config["moe_layers"] == [1] * 8
    mor = config["mor"]
    assert mor["capacities"] == [1.0, 0.5, 0.25] and mor["alpha"] == 0.1
    assert (mor["sharing"], mor["inference_rule"], mor["kv_sharing"], mor["temperature"]) == (
        "middle_sequence", "topk", True, 2.0)
    tensors = read_safetensors(os.path.join(root, "token_loss_free"))
    assert torch.equal(tensors["model.recursion.router.router_bias"], DEPTH_BIAS)
    assert tensors["model.recursion.router.router.weight"].shape == (3, 32)
    assert tensors["model.recursion.layers.0.mlp.gate.selection_bias"].abs().max() > 0
    assert "model.recursion.layers.1.mlp.gate.weight" not in tensors       # a dense slot
    assert "model.layers.1.mlp.gate.weight" not in tensors                 # dense last layer
    expert = read_safetensors(os.path.join(root, "expert_threshold"))
    assert {k for k in expert if k.startswith("model.recursion.router.")} == {
        f"model.recursion.router.routers.{r}.weight" for r in range(3)}


@pytest.mark.timeout(700)
def test_greedy_generation_recomputes_without_a_kv_cache(results):
    assert results[1]["token_loss_free"]["greedy"]


# ---- import ------------------------------------------------------------------------------------

@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_export_import_export_is_the_identity(name, results):
    r = results[1][name]
    assert r["import_same"] and r["reexport_same"]
    assert r["same_config.json"] and r["same_model.safetensors.index.json"]
    assert r["import_err"] < 1e-6, r["import_err"]
    if name == "token_loss_free":   # depth bias + selection biases (first layer, pool slot 1)
        assert r["buffers_loaded"] == 1 + 2


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", EP2_CASES)
def test_imported_mor_model_under_ep2_gives_the_same_logits(name, results):
    out, ours = os.path.join(results[0], name), results[1][name]["ours"]
    err, moved = imported_errors(out, ["parallel.expert=2"], ours, "roll_experts")
    print(f"{name} EP2: max |Δ| {err:.2e}, rolled experts {moved:.2e}")
    assert err < TOL and moved > 100 * TOL


@pytest.mark.timeout(700)
def test_imported_mor_model_under_tp2_gives_the_same_logits(results):
    """TP2 + SP with MoE in the pool: k_r = 16, 8, 4 divide by TP (config/mor.py)."""
    out, ours = os.path.join(results[0], "expert_topk_kv"), results[1]["expert_topk_kv"]["ours"]
    err, moved = imported_errors(out, ["parallel.tensor=2"], ours, "roll_experts")
    print(f"expert_topk_kv TP2: max |Δ| {err:.2e}, rolled experts {moved:.2e}")
    assert err < TOL and moved > 100 * TOL


def convert_task(root):
    """`megamoe convert` both ways from a checkpoint of the token-choice loss-free model."""
    from megamoe.models.lm.model import moe_layers
    from megamoe.mor.decoder import mor_decoders

    cfg, engine = _build(CASES["token_loss_free"])
    _randomize(engine, "token_loss_free")
    ours, _ = _megamoe_eval(engine, sample_tokens_BS(TINY_VOCAB))
    engine2 = convert_both_ways(engine, cfg, root, lambda: _build(CASES["token_loss_free"]),
                                meta={"vocab_size": TINY_VOCAB})
    got, _ = _megamoe_eval(engine2, sample_tokens_BS(TINY_VOCAB))
    biases = [layer.router.selection_bias.clone() for layer in moe_layers(engine.modules)]
    biases2 = [layer.router.selection_bias.clone() for layer in moe_layers(engine2.modules)]
    return {"err": max_abs_diff(got, ours),
            "depth_bias": mor_decoders(engine2.modules)[0].recursion.router.router_bias.clone(),
            "selection_same": all(torch.equal(a, b) for a, b in zip(biases, biases2))}


@pytest.mark.timeout(300)
def test_convert_carries_mor_router_buffers_both_ways(tmp_path):
    r = run_distributed(convert_task, 1, str(tmp_path))[0]
    assert torch.equal(r["depth_bias"], DEPTH_BIAS) and r["selection_same"]
    assert r["err"] < 1e-6, r["err"]


# ---- refusals ----------------------------------------------------------------------------------

def test_mor_exports_as_remote_code_and_transformers_families_name_the_field():
    from megamoe.checkpoint import hf_mixtral
    from megamoe.checkpoint.hf import family_for

    cfg = tiny_config(["model.num_layers=8", "model.mor.enabled=true", *TOKEN])
    assert family_for(cfg).MODEL_TYPE == "megamoe"
    assert any(p.startswith("model.mor.enabled:") for p in hf_mixtral.problems(cfg))


def test_an_unknown_mor_option_is_refused_naming_it(monkeypatch, tmp_path):
    """A `model.mor` option the export does not carry (here: temperature, pretended unknown)
    is refused when it is not at its default, rather than silently dropped."""
    from megamoe.checkpoint import hf_mor
    from megamoe.checkpoint.hf import export_hf

    monkeypatch.setattr(hf_mor, "INFERENCE", tuple(f for f in hf_mor.INFERENCE
                                                   if f != "temperature"))
    base = ["model.num_layers=8", "model.mor.enabled=true", *TOKEN]
    assert hf_mor.problems(tiny_config(base)) == []
    with pytest.raises(ValueError, match=r"model\.mor\.temperature: 2\.0"):
        export_hf({}, tiny_config([*base, "model.mor.temperature=2.0"]), str(tmp_path / "o"))


@pytest.mark.timeout(700)
def test_remote_code_refuses_what_it_cannot_run(results, tmp_path):
    from megamoe.checkpoint.hf import import_hf

    src = os.path.join(results[0], "expert_threshold_kv_cycle")
    bad = copy_with_config(src, tmp_path / "bad", {"mor.inference_rule": "argmax"})
    with pytest.raises(ValueError, match=r"config\.json: mor\.inference_rule: 'argmax'"):
        import_hf(bad)
    hf, _ = load_hf(src)
    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    padded_BS = torch.ones_like(tokens_BS)
    padded_BS[:, 0] = 0
    with pytest.raises(ValueError, match="attention_mask: padding"):
        hf(input_ids=tokens_BS, attention_mask=padded_BS)
    # step 0 (capacity 1) keeps every token whatever its σ, so KV sharing always has the
    # whole sequence's K/V: flipping the step-0 router changes nothing at step 0
    with torch.no_grad():
        hf(input_ids=tokens_BS)
        kept = hf.model.recursion.last_kept[0].tolist()
        hf.model.recursion.router.routers[0].weight.neg_()
        hf(input_ids=tokens_BS)
    assert kept == hf.model.recursion.last_kept[0].tolist() == [tokens_BS.shape[1]] * len(kept)
