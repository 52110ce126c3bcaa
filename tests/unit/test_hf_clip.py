"""A CLIP-exact vit encoder against transformers' CLIP vision tower, as LLaVA reads it
(megamoe.checkpoint.hf_clip): a vision tower's features equal those LLaVA takes from the
mapped CLIPVisionModel within 1e-4, before and after LLaVA's projector (negative controls: q
and k swapped in one layer, the pre-encoder LayerNorm dropped); the mapping back reproduces the
parameters exactly; a CLIP of more layers read at layer -2 imports as a tower computing
LLaVA's features; the classifier's pooled token is CLIP's pooled output and a CLIP-exact
classifier trains a step; configs CLIP cannot express are refused naming the field."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import ConfigError, load_config
from megamoe.models.checks import check_config
from megamoe.testing.parity import TINY_VIT
from megamoe.testing.pool import run_distributed

CLIP = ["model.moe.num_experts=0", "model.num_query_groups=4", "model.vit.pre_norm=true", "model.vit.patch_bias=false"]
CASES = {   # (overrides, LLaVA's vision_feature_layer on a CLIP holding every layer)
    "default_gelu_all_layers": (["model.vit.vision_feature_layer=-1"], -1),
    "full_quick_gelu_layer_-2": (["model.vit.activation=quick_gelu",
                                  "model.vit.vision_feature_layer=-2",
                                  "model.vit.vision_feature_select_strategy=full"], -2),
}


def _llava(vision_config, cfg_fields: dict):
    """A tiny LlavaModel around `vision_config` (a one-layer Mixtral as the text model)."""
    from transformers import LlavaConfig, MixtralConfig
    from transformers.models.llava.modeling_llava import LlavaModel

    text = MixtralConfig(vocab_size=32, hidden_size=24, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         num_local_experts=2)
    torch.manual_seed(0)
    return LlavaModel(LlavaConfig(vision_config=vision_config, text_config=text,
                                  image_token_id=3, **cfg_fields)).eval()


def _randomise(chunks, seed: int) -> None:
    """Weights far from the small initialisation (norm weights too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _tower(cfg, engine):
    from megamoe.models.init import init_global
    from megamoe.models.vit.model import build_vision_tower, transformer_config

    tconfig = transformer_config(cfg, engine.dims, sequence_parallel=False,
                                 dtype=torch.float32, tower=True)
    tower = build_vision_tower(cfg, tconfig, engine.grid).eval()
    init_global([tower], cfg.run.seed, cfg.model.init_method_std, cfg.model.num_layers)
    return tower


def export_task(overrides):
    """Features of a tower and of the LLaVA it maps into; controls; the round trips."""
    from megamoe.checkpoint.hf_clip import (
        clip_vision_config, from_clip, llava_vision_fields, to_clip)
    from megamoe.engines.megatron import build_engine
    from megamoe.models.global_view import gather_global
    from megamoe.testing.parity import tiny_config

    cfg = tiny_config(["parallel.world_size=1", *TINY_VIT, *CLIP, *overrides])
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    tower = _tower(cfg, engine)
    _randomise([tower], 3)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        ours_BSD = tower.features(images).transpose(0, 1)
    tensors = gather_global([tower])
    llava = _llava(clip_vision_config(cfg), llava_vision_fields(cfg))
    llava.vision_tower.load_state_dict(to_clip(tensors, cfg), strict=True)

    def theirs():
        with torch.no_grad():
            out = llava.get_image_features(pixel_values=images)
            selected = out.hidden_states[llava.config.vision_feature_layer]
            if cfg.model.vit.vision_feature_select_strategy == "default":
                selected = selected[:, 1:]
            return selected, torch.stack(out.pooler_output)

    feats, projected = theirs()
    with torch.no_grad():
        ours_projected = llava.multi_modal_projector(ours_BSD)
    result = {"shape": tuple(ours_BSD.shape), "err": (ours_BSD - feats).abs().max().item(),
              "scale": ours_BSD.abs().max().item(),
              "projected_err": (ours_projected - projected).abs().max().item()}
    attn = llava.vision_tower.encoder.layers[0].self_attn       # control 1: q and k swapped
    with torch.no_grad():
        for kind in ("weight", "bias"):
            q, k = getattr(attn.q_proj, kind).clone(), getattr(attn.k_proj, kind).clone()
            getattr(attn.q_proj, kind).copy_(k)
            getattr(attn.k_proj, kind).copy_(q)
    result["swapped_qk"] = (ours_BSD - theirs()[0]).abs().max().item()
    llava.vision_tower.load_state_dict(to_clip(tensors, cfg), strict=True)
    pre_norm, llava.vision_tower.pre_layrnorm = llava.vision_tower.pre_layrnorm, \
        torch.nn.Identity()                                     # control 2: no pre-LN
    result["no_pre_norm"] = (ours_BSD - theirs()[0]).abs().max().item()
    llava.vision_tower.pre_layrnorm = pre_norm
    back = from_clip(to_clip(tensors, cfg, prefix="model.vision_tower."), cfg,
                     prefix="model.vision_tower.")
    result["round_trip_keys"] = sorted(back) == sorted(tensors)
    result["round_trip_exact"] = all(torch.equal(back[k], tensors[k]) for k in tensors)

    # the classifier: all layers, final LayerNorm = CLIP's post_layernorm, the head left out
    classifier = engine.modules[0].eval()
    _randomise([classifier], 5)
    everything = gather_global(engine.modules)
    clip = _llava(clip_vision_config(cfg, tower=False), {}).vision_tower
    clip.load_state_dict(to_clip(everything, cfg, tower=False), strict=True)
    with torch.no_grad():
        hidden_SBD = classifier.decoder(hidden_states=classifier.embedding(images),
                                        attention_mask=None)
        pooled = clip(pixel_values=images).pooler_output
    result["pooled_err"] = (hidden_SBD[0] - pooled).abs().max().item()
    back = from_clip(to_clip(everything, cfg, tower=False), cfg, tower=False)
    result["classifier_round_trip"] = (
        sorted(back) == sorted(k for k in everything if not k.startswith("head."))
        and all(torch.equal(back[k], everything[k]) for k in back))
    return result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_tower_features_are_llavas(name):
    overrides, _ = CASES[name]
    r = run_distributed(export_task, 1, overrides)[0]
    cls_kept = "full" in name
    assert r["shape"] == (3, 16 + cls_kept, 32), r
    assert r["scale"] > 0.1, r
    assert r["err"] <= 1e-4 and r["projected_err"] <= 1e-4, r
    assert r["swapped_qk"] > 1e-3 and r["no_pre_norm"] > 1e-3, r
    assert r["round_trip_keys"] and r["round_trip_exact"], r
    assert r["pooled_err"] <= 1e-4, r
    assert r["classifier_round_trip"], r


def import_task():
    """A 3-layer CLIP read at layer -2 → a megamoe tower of 2 layers: LLaVA's features."""
    from transformers import CLIPVisionConfig

    from megamoe.checkpoint.global_load import load_global_into
    from megamoe.checkpoint.hf_clip import from_clip, vit_overrides
    from megamoe.engines.megatron import build_engine

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4, image_size=16, patch_size=4,
                              hidden_act="quick_gelu", layer_norm_eps=1e-6)
    llava = _llava(vision, {"vision_feature_layer": -2})
    with torch.no_grad():
        for p in llava.vision_tower.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    overrides = vit_overrides(vision, vision_feature_layer=-2)
    cfg = load_config(None, [*TINY_VIT, "parallel.world_size=1", "model.num_query_groups=2",
                             "model.kv_channels=4", *overrides])
    check_config(cfg, launch=False)
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    tower = _tower(cfg, engine)
    load_global_into([tower], from_clip(llava.state_dict(), cfg,
                                        prefix="vision_tower."))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ours = tower.features(images).transpose(0, 1)
        theirs = llava.get_image_features(pixel_values=images).hidden_states[-2][:, 1:]
    return {"layers": len(tower.decoder.layers), "err": (ours - theirs).abs().max().item(),
            "scale": ours.abs().max().item(), "eps": cfg.model.norm_epsilon}


@pytest.mark.timeout(300)
def test_clip_read_at_layer_minus_2_imports_as_a_tower():
    r = run_distributed(import_task, 1)[0]
    assert r["layers"] == 2 and r["eps"] == 1e-6, r
    assert r["scale"] > 0.1 and r["err"] <= 1e-4, r


def train_task():
    """One SGD step of a CLIP-exact classifier; its counted and built parameters."""
    from megamoe.engines.megatron import build_engine
    from megamoe.models.vit.accounting import parameter_counts
    from megamoe.testing.parity import parity_run, tiny_config

    cfg = tiny_config(["parallel.world_size=1", *TINY_VIT, *CLIP,
                       "model.vit.activation=quick_gelu"])
    run = parity_run(cfg, 6, steps=2)
    engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
    built = sum(p.numel() for p in engine.modules[0].parameters())
    return {"losses": run.losses, "counted": parameter_counts(cfg)[0], "built": built,
            "keys": sorted(k for k in run.params if k.startswith("embedding."))}


@pytest.mark.timeout(300)
def test_clip_exact_classifier_trains():
    r = run_distributed(train_task, 1)[0]
    assert all(torch.isfinite(torch.tensor(r["losses"]))), r
    assert r["losses"][1] != r["losses"][0], r       # the step changed the model
    assert r["counted"] == r["built"], r
    assert r["keys"] == ["embedding.class_token", "embedding.position_embeddings",
                         "embedding.pre_norm.bias", "embedding.pre_norm.weight",
                         "embedding.proj.weight"], r


def _cfg(*overrides):
    cfg = load_config(None, [*TINY_VIT, *CLIP, *overrides])
    check_config(cfg, launch=False)
    return cfg


@pytest.mark.parametrize("overrides,field", [
    (["model.moe.num_experts=4"], "model.moe.num_experts:"),
    (["model.num_query_groups=2"], "model.num_query_groups:"),
    (["model.kv_channels=4"], "model.kv_channels:"),
    (["model.vit.pool=gap"], "model.vit.pool:"),
    (["model.vit.position_embedding=sincos"], "model.vit.position_embedding:"),
    (["model.vit.pre_norm=false"], "model.vit.pre_norm:"),
    (["model.vit.patch_bias=true"], "model.vit.patch_bias:"),
])
def test_not_clip_exact_is_refused_naming_the_field(overrides, field):
    from megamoe.checkpoint.hf_clip import clip_vision_config, problems, to_clip

    cfg = _cfg(*overrides)
    assert [p.split(":")[0] + ":" for p in problems(cfg)] == [field]
    for call in (lambda: clip_vision_config(cfg), lambda: to_clip({}, cfg)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(f"not CLIP-exact: {field}"), str(err.value)
        assert "\n" not in str(err.value)


def test_moe_after_the_tower_is_clip_exact():
    """MoE layers the tower does not run (after the layer LLaVA reads) do not matter."""
    from megamoe.checkpoint.hf_clip import problems

    assert problems(_cfg("model.moe.num_experts=4", "model.moe.layer_freq=[0,0,0,1]",
                         "model.vit.vision_feature_layer=-2")) == []
    assert problems(_cfg()) == []


@pytest.mark.parametrize("overrides,field", [
    (["model.vit.vision_feature_layer=5"], "model.vit.vision_feature_layer:"),
    (["model.vit.vision_feature_layer=-6"], "model.vit.vision_feature_layer:"),
    (["model.vit.vision_feature_layer=0"], "model.vit.vision_feature_layer:"),
    (["model.vit.activation=relu"], "model.vit.activation:"),
    (["model.vit.vision_feature_select_strategy=cls"],
     "model.vit.vision_feature_select_strategy:"),
])
def test_bad_clip_options_are_one_config_error(overrides, field):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)


def test_megamoe_vit_remote_code_refuses_clip_options():
    from megamoe.checkpoint.hf import family_for

    with pytest.raises(ValueError) as err:
        family_for(_cfg())
    assert "model.vit.pre_norm: true" in str(err.value)
    assert "model.vit.patch_bias: false" in str(err.value)


def test_image_processor_gives_megamoes_pixels():
    """CLIPImageProcessor with `image_processor_fields` maps uint8 images to x/127.5 − 1, the
    pixels megamoe's patch embedding computes (control: CLIP's own normalisation differs)."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from megamoe.checkpoint.hf_clip import image_processor_fields

    fields = image_processor_fields(_cfg())
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    want = images.float() / 127.5 - 1.0
    got = CLIPImageProcessor(**fields)(images=list(images), return_tensors="pt").pixel_values
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6
    clip_norm = CLIPImageProcessor(**{**fields, "image_mean": OPENAI_CLIP_MEAN,
                                      "image_std": OPENAI_CLIP_STD})
    other = clip_norm(images=list(images), return_tensors="pt").pixel_values
    assert (other - want).abs().max() > 0.1
