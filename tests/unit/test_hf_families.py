"""Hugging Face families beyond Mixtral/Qwen2-MoE (megamoe.checkpoint.hf): Qwen3-MoE and the
remote-code export (model_type "megamoe").

For Qwen3-MoE and two remote-code models (sigmoid scores + QK-norm + gated shared expert + tied
embeddings; MoE/dense layers [1,0,1,0] + qkv bias + ungated shared expert + unrenormalised top k)
transformers' logits equal megamoe's within 1e-4, and fail that bound when one expert weight in
the folder or one config field (router scores, renormalisation) is changed; the export writes
several shards; export → import → export is the identity; greedy generation with the KV cache
equals recomputing the whole prefix; `family_for` picks the first exact family (capacity
dropping, Expert Race's PLR router and MoR's per-recursion LoRA go to the remote code) and
refuses only what the remote code cannot express (`model.mor` options it does not know).
"""

import ast
import json
import os
import shutil
import sys

import pytest
import torch

from megamoe.config.schema import MoEConfig
from megamoe.testing.hf import (
    SHARD_BYTES, TOL, build_tiny, copy_with_config, greedy_matches_recompute, hf_logits_BSV,
    imported_task, load_and_gather_task, load_hf, max_abs_diff, megamoe_logits_BSV,
    sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB, tiny_config
from megamoe.testing.pool import run_distributed

# `model.moe.renormalize` comes with the router variants; without it megamoe always renormalises
HAS_RENORMALIZE = "renormalize" in MoEConfig.__dataclass_fields__
RENORM_OFF = ["model.moe.renormalize=false"] if HAS_RENORMALIZE else []

QWEN3MOE = ["model.qk_layernorm=true", "model.moe.layer_freq=[1,1,0,1]",
            "model.tie_embeddings=true", "model.init_method_std=0.1"]
REMOTE_SIGMOID = ["model.qk_layernorm=true", "model.moe.score_function=sigmoid",
                  "model.moe.shared_expert_ffn_hidden_size=32", "model.moe.shared_expert_gate=true",
                  "model.tie_embeddings=true", "model.init_method_std=0.1"]
REMOTE_MIXED = ["model.moe.layer_freq=[1,0,1,0]", "model.add_qkv_bias=true",
                "model.moe.shared_expert_ffn_hidden_size=32", *RENORM_OFF,
                "model.init_method_std=0.1"]
FLIPS = {"qwen3_moe": "norm_topk_prob", "megamoe": "score_function"}   # control: flip it
FLIPPED = {True: False, False: True, "softmax": "sigmoid", "sigmoid": "softmax"}


def _edited_copy(src, dst, *, tensor=None, field=None):
    """A copy of the folder with one expert's weight doubled (`tensor`: its name; of a
    fused [E, …] tensor, expert 1) or one config.json field flipped (`field`: its name)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if field is not None:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            config = json.load(f)
        config[field] = FLIPPED[config[field]]
        with open(path, "w") as f:
            json.dump(config, f)
    if tensor is not None:
        with open(os.path.join(dst, "model.safetensors.index.json")) as f:
            shard = os.path.join(dst, json.load(f)["weight_map"][tensor])
        tensors = load_file(shard)
        t = tensors[tensor]
        (t[1] if t.dim() == 3 else t).mul_(2.0)
        save_file(tensors, shard, metadata={"format": "pt"})


def export_task(overrides, out_dir):
    """Export a megamoe model and compare transformers' logits with megamoe's: as exported,
    with one expert weight doubled and with one config field flipped."""
    from megamoe.checkpoint.hf import export_hf, family_for
    from megamoe.models.global_view import gather_global

    cfg, engine = build_tiny(overrides)
    tensors = gather_global(engine.modules)
    export_hf(tensors, cfg, out_dir, max_shard_bytes=SHARD_BYTES)
    family = family_for(cfg)
    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    ours = megamoe_logits_BSV(engine, tokens_BS)
    hf, not_loaded = load_hf(out_dir)
    err = max_abs_diff(hf_logits_BSV(hf, tokens_BS), ours)
    expert = ("model.layers.0.mlp.experts.down_proj" if family.NAMES.fused_experts
              else "model.layers.0.mlp.experts.1.down_proj.weight")
    controls = {}
    for name, edit in (("expert", {"tensor": expert}),
                       ("field", {"field": FLIPS[family.MODEL_TYPE]})):
        copy = f"{out_dir}-{name}"
        _edited_copy(out_dir, copy, **edit)
        controls[name] = max_abs_diff(hf_logits_BSV(load_hf(copy)[0], tokens_BS), ours)
        shutil.rmtree(copy)
    return {"err": err, "controls": controls, "scale": ours.abs().max().item(),
            "architecture": type(hf).__name__, "not_loaded": not_loaded, "tensors": tensors,
            "greedy": greedy_matches_recompute(hf, tokens_BS[:, :6], steps=4)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name → (folder, export_task's result), exported once for the module."""
    root = tmp_path_factory.mktemp("families")
    return {name: (str(root / name), run_distributed(export_task, 1, ov, str(root / name))[0])
            for name, ov in (("qwen3moe", QWEN3MOE), ("remote_sigmoid", REMOTE_SIGMOID),
                             ("remote_mixed", REMOTE_MIXED))}


# ---- export: logits, shards, controls ----------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,architecture", [("qwen3moe", "Qwen3MoeForCausalLM"),
                                               ("remote_sigmoid", "MegamoeForCausalLM"),
                                               ("remote_mixed", "MegamoeForCausalLM")])
def test_transformers_logits_equal_megamoe_and_edits_break_them(name, architecture, exports):
    out, r = exports[name]
    assert r["architecture"] == architecture and r["not_loaded"] == {}
    assert r["err"] < TOL, r["err"]
    assert r["scale"] > 0.1                         # logits are not trivially small
    for control, err in r["controls"].items():      # a changed expert or field shows
        assert err > 100 * TOL, (control, err)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in os.listdir(out)


@pytest.mark.timeout(300)
def test_remote_code_folder_is_self_contained_and_generates(exports):
    from megamoe.checkpoint import hf_megamoe

    for name in ("remote_sigmoid", "remote_mixed"):
        out, r = exports[name]
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        assert config["model_type"] == "megamoe" and config["auto_map"] == hf_megamoe.AUTO_MAP
        for code in hf_megamoe.CODE_FILES:         # the package's files, as they are
            with open(os.path.join(out, code)) as a, \
                    open(os.path.join(hf_megamoe.CODE_DIR, code)) as b:
                assert a.read() == b.read()
        assert r["greedy"]                         # KV-cache decoding = full recompute
    for code in hf_megamoe.CODE_FILES:             # only the standard library, torch, transformers
        tree = ast.parse(open(os.path.join(hf_megamoe.CODE_DIR, code)).read())
        roots = {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.level == 0}
        roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                  for a in n.names}
        roots -= set(sys.stdlib_module_names)
        assert roots <= {"torch", "transformers"}, (code, roots)
    with open(os.path.join(exports["remote_mixed"][0], "config.json")) as f:
        mixed = json.load(f)
    assert mixed["moe_layers"] == [1, 0, 1, 0] and mixed["norm_topk_prob"] == (not HAS_RENORMALIZE)
    assert mixed["shared_expert_gate"] is False and mixed["qkv_bias"] is True


@pytest.mark.timeout(300)
def test_qwen3moe_config_names_dense_layers_and_qk_norm(exports):
    with open(os.path.join(exports["qwen3moe"][0], "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen3_moe" and "auto_map" not in config
    assert config["mlp_only_layers"] == [2] and config["decoder_sparse_step"] == 1
    assert config["norm_topk_prob"] is True and config["attention_bias"] is False
    assert not [f for f in os.listdir(exports["qwen3moe"][0]) if f.endswith(".py")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["qwen3moe", "remote_sigmoid", "remote_mixed"])
def test_export_import_export_is_the_identity(name, exports, tmp_path):
    from megamoe.checkpoint.hf import export_hf, import_hf, read_safetensors

    out, r = exports[name]
    hf_overrides, tensors = import_hf(out)
    assert sorted(tensors) == sorted(r["tensors"])
    assert all(torch.equal(tensors[k], t) for k, t in r["tensors"].items())
    again = str(tmp_path / "again")
    export_hf(tensors, tiny_config(hf_overrides), again, max_shard_bytes=SHARD_BYTES)
    first, second = read_safetensors(out), read_safetensors(again)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    for fname in ("config.json", "model.safetensors.index.json"):
        with open(os.path.join(out, fname)) as a, open(os.path.join(again, fname)) as b:
            assert json.load(a) == json.load(b), fname


@pytest.fixture(scope="module")
def hf_qwen3moe(tmp_path_factory):
    """A randomly initialised transformers Qwen3-MoE (head_dim ≠ hidden/heads, a dense layer,
    transformers' default norm_topk_prob=false where megamoe can express it), saved."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=40, head_dim=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                            mlp_only_layers=[1], norm_topk_prob=not HAS_RENORMALIZE,
                            initializer_range=0.1, max_position_embeddings=64)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():                 # q/k norms away from 1 so that a lost norm shows
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    out = str(tmp_path_factory.mktemp("hf") / "qwen3moe")
    model.save_pretrained(out)
    return out, hf_logits_BSV(model, sample_tokens_BS(96))


@pytest.mark.timeout(300)
def test_imported_qwen3moe_matches_transformers(hf_qwen3moe):
    out, reference = hf_qwen3moe
    assert reference.abs().max() > 0.1
    assert (run_distributed(imported_task, 1, out)[0] - reference).abs().max().item() < TOL
    control = run_distributed(imported_task, 1, out, ["model.qk_layernorm=false"])
    assert (control[0] - reference).abs().max().item() > 100 * TOL


@pytest.mark.timeout(300)
def test_remote_export_loads_into_tp2_and_gathers_back_the_same_tensors(exports):
    out = exports["remote_sigmoid"][0]       # QK-norm, gated shared expert, tied, under TP
    assert run_distributed(load_and_gather_task, 2, out, ["parallel.tensor=2"])[0] == 0.0


def test_import_refuses_a_remote_config_the_code_cannot_run(exports, tmp_path):
    from megamoe.checkpoint.hf import import_hf

    bad = copy_with_config(exports["remote_sigmoid"][0], tmp_path / "bad",
                           {"router": "no_such_router"})
    with pytest.raises(ValueError, match=r"config\.json: router: 'no_such_router'"):
        import_hf(bad)


# ---- which family ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,model_type", [
    ([], "mixtral"),
    (["model.moe.shared_expert_ffn_hidden_size=32", "model.moe.shared_expert_gate=true",
      "model.add_qkv_bias=true", "model.moe.layer_freq=2"], "qwen2_moe"),
    (["model.qk_layernorm=true"], "qwen3_moe"),
    (["model.qk_layernorm=true", "model.moe.layer_freq=2", "model.tie_embeddings=true"],
     "qwen3_moe"),
    (["model.moe.layer_freq=2"], "megamoe"),                           # dense layers alone
    (["model.moe.score_function=sigmoid"], "megamoe"),
    (["model.qk_layernorm=true", "model.add_qkv_bias=true"], "megamoe"),
    (["model.qk_layernorm=true", "model.moe.shared_expert_ffn_hidden_size=32",
      "model.moe.shared_expert_gate=true"], "megamoe"),
    (["model.moe.shared_expert_ffn_hidden_size=32"], "megamoe"),       # ungated
    (["model.moe.num_experts=0"], "megamoe"),                          # dense model
    (["model.moe.loss_free_bias_rate=0.001"], "megamoe"),              # selection bias buffer
    (["model.moe.router=race", "model.moe.z_loss_coeff=0", "model.moe.aux_loss_coeff=0",
      "model.moe.allow_non_causal=true"], "megamoe"),                  # other router families
    (["model.moe.capacity_factor=1.5", "model.moe.allow_non_causal=true"], "megamoe"),  # drops
    (["model.moe.router=race", "model.moe.z_loss_coeff=0", "model.moe.aux_loss_coeff=0",
      "model.moe.allow_non_causal=true", "model.moe.race.plr_coeff=0.1"], "megamoe"),
    (["model.num_layers=8", "model.mor.enabled=true", "model.mor.router=token",
      "model.mor.lora_rank=4"], "megamoe"),                            # per-recursion LoRA
    (["model.num_layers=8", "model.mor.enabled=true", "model.mor.router=token",
      "model.moe.capacity_factor=1.5", "model.moe.allow_non_causal=true"], "megamoe"),
    *([(RENORM_OFF, "megamoe"), ([*RENORM_OFF, "model.qk_layernorm=true"], "qwen3_moe")]
      if HAS_RENORMALIZE else []),
])
def test_family_for_picks_the_first_exact_family_else_remote_code(overrides, model_type):
    from megamoe.checkpoint.hf import family_for

    assert family_for(tiny_config(overrides)).MODEL_TYPE == model_type


def test_export_refuses_only_what_remote_code_cannot_express(monkeypatch, tmp_path):
    """What is left to refuse: a `model.mor` option the export does not know (here
    `temperature`, pretended unknown) when it is not at its default; nothing is written."""
    from megamoe.checkpoint import hf_mor
    from megamoe.checkpoint.hf import export_hf

    monkeypatch.setattr(hf_mor, "INFERENCE", tuple(f for f in hf_mor.INFERENCE
                                                   if f != "temperature"))
    cfg = tiny_config(["model.num_layers=8", "model.mor.enabled=true", "model.mor.router=token",
                       "model.mor.temperature=2.0"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.mor\.temperature"):
        export_hf({}, cfg, str(out))
    assert not out.exists() and os.listdir(tmp_path) == []
