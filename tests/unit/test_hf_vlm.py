"""The vlm family's Hugging Face export, both paths: a CLIP-exact vlm with a Mixtral-,
Qwen2-MoE- or Qwen3-MoE-exact LM exports to transformers' `LlavaForConditionalGeneration`;
anything else (pixel shuffle 2, mean pooling, a biased patch projection, VLMo modality experts,
an MoE encoder layer, a Mixture-of-Recursions LM with tied embeddings) to megamoe's remote code
(`trust_remote_code`, offline). Image+text logits equal megamoe's eval-mode logits within 1e-4,
with negative controls (LLaVA: projector layers swapped; remote code: pixel shuffle's block
order transposed; both: one expert perturbed); the import gives back every parameter and router
buffer exactly (LLaVA also through `megamoe convert --from hf` and `--to hf` again); configs
and folders neither side can take are refused naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamoe.config import load_config
from megamoe.models.checks import check_config
from megamoe.testing.parity import TINY_VLM
from megamoe.testing.pool import run_distributed

# CLIP's tower (class token, learned positions, pre-norm, no patch bias) on 16x16 images in
# 8x8 patches (4 image tokens), read by a Mixtral-exact LM
LLAVA = ["model.vit.patch_size=8", "model.vit.pool=cls", "model.vlm.pixel_shuffle=1",
         "model.vit.pre_norm=true", "model.vit.patch_bias=false",
         "model.vit.activation=quick_gelu"]
# what LLaVA cannot express: the recipe's pixel shuffle 2 over 16 patches, mean pooling, a
# biased patch projection, and VLMo's modality experts (image tokens → expert 1, text → 0)
REMOTE = ["model.moe.router=modality", "model.moe.modality.mode=vlmo", "model.moe.topk=1",
          "model.moe.z_loss_coeff=0", "model.moe.aux_loss_coeff=0"]
CASES = {   # (overrides, model_type, text model_type)
    "llava": (LLAVA, "llava", "mixtral"),
    "llava_qwen2_moe": ([*LLAVA, "model.moe.shared_expert_ffn_hidden_size=32",
                         "model.moe.shared_expert_gate=true", "model.add_qkv_bias=true"],
                        "llava", "qwen2_moe"),
    "llava_qwen3_moe": ([*LLAVA, "model.qk_layernorm=true"], "llava", "qwen3_moe"),
    "remote_code": (REMOTE, "megamoe_vlm", "megamoe"),
    # an MoE FFN in the encoder's second layer (top-2 of model.moe's 4 experts), with the
    # loss-free bias: the encoder's router buffer is exported apart from the LM's layer 2's
    "remote_encoder_moe": (["model.vlm.encoder_moe_layer_freq=[0,1]",
                            "model.moe.loss_free_bias_rate=0.01"], "megamoe_vlm", "megamoe"),
    # a Mixture-of-Recursions LM (token-choice depth router with its loss-free bias buffer),
    # tied embeddings, a narrower connector; CLIP's tower options under pixel shuffle
    "remote_mor": (["model.mor.enabled=true", "model.mor.num_recursions=2",
                    "model.mor.router=token", "model.mor.sharing=cycle",
                    "model.tie_embeddings=true", "model.vlm.connector_hidden_size=24",
                    *[o for o in LLAVA if "patch_size" not in o and "shuffle" not in o]],
                   "megamoe_vlm", "megamoe"),
}


def _cfg(*overrides, check: bool = True):
    cfg = load_config(None, [*TINY_VLM, "parallel.world_size=1", *overrides])
    if check:
        check_config(cfg, launch=False)
    return cfg


def _hf_logits(hf, batch, pixels):
    with torch.no_grad():
        return hf(input_ids=batch["tokens"], pixel_values=pixels).logits


def _perturb_expert(hf):
    """One expert's weights moved: in the encoder's MoE layer when it has one, else the LM's."""
    with torch.no_grad():
        if any(getattr(hf.config.vision_config, "moe_layers", [])):
            hf.model.vision_tower.encoder.layer[1].mlp.experts.fc1_weight[0].add_(0.5)
            return
        lm = hf.model.language_model
        recursion = getattr(lm, "recursion", None)      # MoR: the shared pool's last layer
        layer = (lm.layers if recursion is None else recursion.layers)[-1]
        moe = layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe
        moe.experts.gate_up_proj[1].add_(0.5)


def _controls(name: str, hf, batch, pixels, ours) -> dict:
    """How far each deliberately broken HF model lands from megamoe's logits."""
    import sys

    out = {}
    if name.startswith("llava"):
        proj = hf.model.multi_modal_projector
        proj.linear_1, proj.linear_2 = proj.linear_2, proj.linear_1   # both [D, D] here
        out["swapped_projector"] = (_hf_logits(hf, batch, pixels) - ours).abs().max().item()
        proj.linear_1, proj.linear_2 = proj.linear_2, proj.linear_1
    else:
        module = sys.modules[type(hf).__module__]
        shuffle = module.pixel_shuffle

        def transposed(x_BNE, r):           # blocks read column within the block first
            B, N, E = x_BNE.shape
            s = int(round(N ** 0.5))
            x = x_BNE.reshape(B, s // r, r, s // r, r, E).permute(0, 1, 3, 4, 2, 5)
            return x.reshape(B, (s // r) ** 2, r * r * E)

        module.pixel_shuffle = transposed
        out["transposed_shuffle"] = (_hf_logits(hf, batch, pixels) - ours).abs().max().item()
        module.pixel_shuffle = shuffle
    _perturb_expert(hf)
    out["perturbed_expert"] = (_hf_logits(hf, batch, pixels) - ours).abs().max().item()
    return out


def export_task(name: str, out: str, run_dir: str):
    """megamoe's eval logits against the exported model's; controls; the import back."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessor

    from megamoe.checkpoint.global_load import load_global_into, unstack_layers
    from megamoe.checkpoint.hf import export_hf, family_for, import_hf
    from megamoe.checkpoint.router_state import gather_router_buffers, load_router_buffers
    from megamoe.engines.megatron import build_engine
    from megamoe.models.global_view import gather_global
    from megamoe.models.registry import family_datasets
    from megamoe.models.vlm.model import vision_context

    cfg = _cfg(*CASES[name][0])
    train, _, vocab = family_datasets(cfg)
    engine = build_engine(cfg, vocab, torch.device("cpu"), with_optimizer=False, ddp=False)
    model, task = engine.modules[0].eval(), engine.task
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():           # weights far from the small initialisation
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for key, b in model.named_buffers():    # loss-free biases that change the routing
            if key.endswith("router.selection_bias"):
                b.copy_(torch.randn(b.shape, generator=g))
    batch = task.collate(train.get_batch([0, 1, 2]), [0, 1, 2])
    # every position compared, pads too: transformers' MoE LMs route pads like any token, so
    # megamoe's logits here come without the task's pad marks (which only change pad positions)
    context = dataclasses.replace(task.context(batch, 0), padding_mask_BS=None)
    with torch.no_grad():
        ours = model(batch["tokens"], batch["position_ids"], None, images=batch["images"],
                     context=context,
                     vision_context=vision_context(batch, 0, task.encoder_tokens))[..., :vocab]
    tensors = gather_global(engine.modules)
    export_hf({**tensors, **gather_router_buffers(engine.modules)}, cfg, out)
    remote = not name.startswith("llava")
    hf = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=remote,
                                                     local_files_only=True).eval()
    pixels = batch["images"].float() / 127.5 - 1.0
    theirs = _hf_logits(hf, batch, pixels)
    processed = CLIPImageProcessor.from_pretrained(out)(images=list(batch["images"]),
                                                       return_tensors="pt").pixel_values
    text_type = getattr(hf.config.text_config, "model_type", None)
    result = {"family": family_for(cfg).MODEL_TYPE, "class": type(hf).__name__,
              "text": text_type, "err": (theirs - ours).abs().max().item(),
              "scale": ours.abs().max().item(),
              "processor_err": (processed - pixels).abs().max().item(),
              "uint8_err": (_hf_logits(hf, batch, batch["images"]) - ours).abs().max().item()
              if remote else 0.0,
              **_controls(name, hf, batch, pixels, ours)}
    arch, back = import_hf(out)
    rebuilt = build_engine(load_config(None, [*arch, "parallel.world_size=1"]), vocab,
                           torch.device("cpu"), with_optimizer=False, ddp=False)
    load_global_into(rebuilt.modules, back)
    buffers = load_router_buffers(rebuilt.modules, back)
    again = gather_global(rebuilt.modules)
    flat = unstack_layers(back)
    result["buffers_back"] = gather_router_buffers(rebuilt.modules) == {} or all(
        torch.equal(v, flat[k]) for k, v in gather_router_buffers(rebuilt.modules).items())
    result["buffer_keys"] = sorted(gather_router_buffers(engine.modules))
    result["buffers"] = buffers
    result["round_trip"] = sorted(again) == sorted(tensors) and all(
        torch.equal(again[k], tensors[k]) for k in tensors)
    if name == "llava":             # `megamoe convert --from hf`, then `--to hf` again
        from safetensors.torch import load_file

        from megamoe.commands.convert import from_hf, to_hf

        from_hf(out, run_dir, log=lambda *_: None)
        to_hf(run_dir, out + "-again", log=lambda *_: None)
        a, b = (load_file(f"{d}/model.safetensors") for d in (out, out + "-again"))
        result["convert_round_trip"] = sorted(a) == sorted(b) and all(
            torch.equal(a[k], b[k]) for k in a)
    return result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_export_logits_controls_and_import(name, tmp_path):
    r = run_distributed(export_task, 1, name, str(tmp_path / "hf"), str(tmp_path / "run"))[0]
    _, model_type, text_type = CASES[name]
    assert (r["family"], r["text"]) == (model_type, text_type), r
    assert r["class"] == ("LlavaForConditionalGeneration" if model_type == "llava"
                          else "MegamoeVLMForConditionalGeneration"), r
    assert r["scale"] > 0.1 and r["err"] <= 1e-4 and r["uint8_err"] <= 1e-4, r
    assert r["processor_err"] <= 1e-6, r         # preprocessor_config.json: megamoe's pixels
    assert all(r[k] > 1e-3 for k in r if k in ("swapped_projector", "transposed_shuffle",
                                                "perturbed_expert")), r
    assert r["round_trip"] and r["buffers_back"], r
    assert (r["buffers"] > 0) == (name in ("remote_mor", "remote_encoder_moe")), r
    if name == "remote_encoder_moe":
        assert {"vision.decoder.layers.1.mlp.router.selection_bias",
                "decoder.layers.1.mlp.router.selection_bias"} <= set(r["buffer_keys"]), r
    assert r.get("convert_round_trip", True), r


@pytest.mark.parametrize("overrides,field", [
    (["model.vlm.pixel_shuffle=2"], "model.vlm.pixel_shuffle:"),
    (["model.vlm.connector_hidden_size=48"], "model.vlm.connector_hidden_size:"),
    (["model.vit.pool=gap"], "model.vit.pool:"),
    (["model.vit.patch_bias=true"], "model.vit.patch_bias:"),
    (["model.vit.pre_norm=false"], "model.vit.pre_norm:"),
    (REMOTE[:4], "model.moe.router:"),
])
def test_what_llava_cannot_express_names_the_field(overrides, field):
    """Each goes to the remote code instead; the problem line names the field."""
    from megamoe.checkpoint import hf_llava, hf_vlm
    from megamoe.checkpoint.hf import family_for

    cfg = _cfg(*LLAVA, *overrides)
    fields = [p.split(" ")[0] for p in hf_llava.problems(cfg)]
    assert fields[0] == field and all(f.endswith(":") for f in fields), fields
    assert family_for(cfg) is hf_vlm
    assert family_for(_cfg(*LLAVA)) is hf_llava


def test_what_neither_expresses_is_refused_naming_the_field():
    from megamoe.checkpoint.hf import family_for

    with pytest.raises(ValueError) as err:
        family_for(_cfg(*LLAVA, "model.modality_norm=expert_adaln"))
    assert "model.modality_norm: 'expert_adaln'" in str(err.value), str(err.value)
    assert "LLaVA or megamoe's remote code" in str(err.value)


def test_encoder_moe_refusals():
    """LLaVA's tower is dense (an MoE layer after the one read does not matter); the remote
    vision tower passes no modality ids or timesteps to its routers."""
    from megamoe.checkpoint import hf_llava, hf_vlm

    moe = "model.vlm.encoder_moe_layer_freq=[0,1]"
    assert [p.split(" ")[0] for p in hf_llava.problems(_cfg(*LLAVA, moe, check=False))] == \
        ["model.vlm.encoder_moe_layer_freq:"]
    assert hf_llava.problems(_cfg(*LLAVA, moe, "model.vit.vision_feature_layer=-2",
                                  check=False)) == []

    cfg = _cfg(*REMOTE, "model.vlm.encoder_moe_layer_freq=[0,1]", check=False)
    assert [p.split(" ")[0] for p in hf_vlm.problems(cfg)] == ["model.moe.router:"]
    assert "model.vlm.encoder_moe_layer_freq" in hf_vlm.problems(cfg)[0]
    assert hf_vlm.problems(_cfg(*REMOTE)) == []


@pytest.mark.parametrize("change,field", [
    ({"image_token_index": 32000}, "image_token_index:"),
    ({"projector_hidden_act": "gelu_pytorch_tanh"}, "projector_hidden_act:"),
    ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer:"),
    ({"text_config": {"model_type": "llama"}}, "text_config.model_type:"),
    ({"vision_config": {"model_type": "clip_vision_model", "layer_norm_eps": 1e-6}},
     "vision_config.layer_norm_eps:"),
])
def test_llava_folders_megamoe_cannot_take_are_refused_naming_the_field(change, field):
    from transformers import LlavaConfig

    from megamoe.checkpoint.hf_llava import from_hf_config

    fields = {"image_token_index": 3, "vision_feature_layer": -1,
              "text_config": {"model_type": "mixtral", "rms_norm_eps": 1e-5},
              "vision_config": {"model_type": "clip_vision_model", "layer_norm_eps": 1e-5},
              **change}
    with pytest.raises(ValueError) as err:
        from_hf_config(LlavaConfig(**fields), "hf/config.json")
    assert str(err.value).startswith(f"hf/config.json: {field}"), str(err.value)
