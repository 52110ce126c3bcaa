"""Mixture-of-Recursions with per-recursion LoRA (Relaxed Recursive Transformers,
`model.mor.lora_rank` > 0) through the remote-code Hugging Face export.

Each case is a tiny MoR model (hidden 32, S = 16, H = 4 query heads in G = 2 groups, so
Megatron's per-group qkv rows and the remote code's [q; k; v] rows differ) whose every
parameter is drawn from a seeded generator — the adapters' B too (B = 0 at initialisation
would make the adapters invisible). transformers' logits (trust_remote_code) equal megamoe's
eval-mode logits within 1e-4; controls on the loaded HF model must move them by > 100× the
tolerance: every adapter's B zeroed, the qkv adapters' B in Megatron's row order (the
conversion skipped), the adapters of steps 0 and 1 swapped. The folder has ≥ 2 shards and
from_pretrained reports no missing or unexpected tensor; export → import → export is the
identity (tensors and config.json); the imported model gives megamoe's logits on one rank and
under TP2 + SP (where B is sharded on its rows, fc1's per SwiGLU half), and zeroing the
imported adapters fails that check; `megamoe convert` carries the adapters from a checkpoint
to the folder and back.
"""

import json
import os

import pytest
import torch

from megamoe.testing.hf import (
    SHARD_BYTES, TOL, convert_both_ways, copy_with_config, export_engine, hf_logits_err,
    imported_errors, load_hf, load_imported, max_abs_diff, megamoe_logits_BSV, reexport,
    sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB
from megamoe.testing.pool import run_distributed
from test_hf_mor import _build, _randomize

LORA = ["model.mor.lora_rank=4"]
CASES = {
    # token-choice, Middle-Cycle L = 8, MoE unique layers around a dense pool, every target,
    # α = 2·rank (null)
    "token_all_targets": ["model.num_layers=8", "model.mor.router=token", *LORA,
                          "model.mor.lora_targets=[qkv,proj,fc1,fc2]",
                          "model.moe.layer_freq=[1,0,0,0,0,0,0,1]"],
    # expert-choice top-k with KV sharing over an MoE pool: steps > 0 read step 0's K/V, which
    # step 0's qkv adapters made; α = 3
    "expert_kv_moe_pool": ["model.num_layers=8", "model.mor.router=expert",
                           "model.mor.allow_non_causal=true", "model.mor.inference_rule=topk",
                           "model.mor.kv_sharing=true", "model.mor.capacities=[1.0,0.5,0.25]",
                           *LORA, "model.mor.lora_targets=[qkv,proj]",
                           "model.mor.lora_alpha=3.0"],
}


def _adapters(hf):
    return hf.model.recursion.lora


@torch.no_grad()
def _controls(hf, ours, tokens_BS, s):
    """(control, max |Δ logits|) of edits to the loaded HF model's adapters."""
    from megamoe.checkpoint.hf_layout import fuse_qkv

    lora = _adapters(hf)
    saved = {k: v.clone() for k, v in lora.state_dict().items()}
    for name, p in lora.named_parameters():
        if name.endswith(".B"):
            p.zero_()
    yield "adapters_zeroed", hf_logits_err(hf, ours, tokens_BS)
    lora.load_state_dict(saved)
    q, kv = s.heads * s.head_dim, s.groups * s.head_dim
    for step in lora:
        for adapters in step:
            B = adapters["qkv"].B
            B.copy_(fuse_qkv(*B.split([q, kv, kv]), s, "control"))   # Megatron's row order
    yield "qkv_B_in_megatron_rows", hf_logits_err(hf, ours, tokens_BS)
    lora.load_state_dict(saved)
    lora[0], lora[1] = lora[1], lora[0]
    yield "steps_0_1_swapped", hf_logits_err(hf, ours, tokens_BS)
    lora[0], lora[1] = lora[1], lora[0]


def lora_task(root):
    """Every case: export, load with transformers, compare, controls, round trip."""
    from megamoe.checkpoint.hf_layout import DecoderShape

    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    results = {}
    for name, overrides in CASES.items():
        cfg, engine = _build(overrides)
        _randomize(engine, name)
        out = os.path.join(root, name)
        tensors = export_engine(engine, cfg, out, max_shard_bytes=SHARD_BYTES)
        ours = megamoe_logits_BSV(engine, tokens_BS)
        hf, not_loaded = load_hf(out)
        r = {"not_loaded": not_loaded, "err": hf_logits_err(hf, ours, tokens_BS),
             "min_abs_B": min(v.abs().max().item() for k, v in tensors.items()
                              if ".lora." in k and k.endswith(".B")),
             "controls": dict(_controls(hf, ours, tokens_BS, DecoderShape.from_config(cfg)))}
        checks, hf_overrides, back = reexport(out, tensors, max_shard_bytes=SHARD_BYTES)
        r.update(checks)
        _, engine2, _ = load_imported(hf_overrides, back, build=_build)
        r["import_err"] = max_abs_diff(megamoe_logits_BSV(engine2, tokens_BS), ours)
        r["ours"] = ours
        results[name] = r
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mor_lora_export"))
    return root, run_distributed(lora_task, 1, root, timeout_s=600)[0]


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_logits_equal_megamoe_eval_logits_with_adapters(name, results):
    r = results[1][name]
    assert r["not_loaded"] == {}, r["not_loaded"]      # no missing / unexpected tensor
    assert r["min_abs_B"] > 0.01                        # every adapter really adds something
    assert r["err"] < TOL, r["err"]
    for control, err in r["controls"].items():
        assert err > 100 * TOL, (control, err)
    print(f"{name}: max |Δ| {r['err']:.2e}, controls "
          + ", ".join(f"{c} {e:.2e}" for c, e in r["controls"].items()))


@pytest.mark.timeout(700)
def test_folder_has_shards_lora_config_and_adapter_tensors(results):
    from megamoe.checkpoint.hf import read_safetensors

    root = results[0]
    for name in CASES:
        shards = [f for f in os.listdir(os.path.join(root, name)) if f.endswith(".safetensors")]
        assert len(shards) >= 2, (name, shards)
    with open(os.path.join(root, "token_all_targets", "config.json")) as f:
        mor = json.load(f)["mor"]
    assert (mor["lora_rank"], mor["lora_alpha"], mor["lora_targets"]) == (
        4, 8.0, ["qkv", "proj", "fc1", "fc2"])
    assert mor["training"]["lora_dropout"] == 0.0
    tensors = read_safetensors(os.path.join(root, "token_all_targets"))
    lora = {k: tuple(v.shape) for k, v in tensors.items() if ".lora." in k}
    assert len(lora) == 3 * 2 * 4 * 2            # (r, j) × targets × {A, B}
    assert lora["model.recursion.lora.2.1.qkv.B"] == (64, 4)          # (H + 2G)·d rows
    assert lora["model.recursion.lora.0.0.fc1.B"] == (128, 4)         # [gate; up]
    assert lora["model.recursion.lora.0.0.fc2.A"] == (4, 64)
    with open(os.path.join(root, "expert_kv_moe_pool", "config.json")) as f:
        assert json.load(f)["mor"]["lora_alpha"] == 3.0


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_export_import_export_is_the_identity_with_adapters(name, results):
    r = results[1][name]
    assert r["import_same"] and r["reexport_same"] and r["same_config.json"]
    assert r["import_err"] < 1e-6, r["import_err"]


@pytest.mark.timeout(700)
@pytest.mark.parametrize("name", list(CASES))
def test_imported_lora_model_under_tp2_gives_the_same_logits(name, results):
    out, ours = os.path.join(results[0], name), results[1][name]["ours"]
    err, moved = imported_errors(out, ["parallel.tensor=2"], ours, "zero_adapters")
    print(f"{name} TP2: max |Δ| {err:.2e}, adapters zeroed {moved:.2e}")
    assert err < TOL and moved > 100 * TOL


def convert_task(root):
    """`megamoe convert` both ways from a checkpoint of the token-choice LoRA model."""
    from megamoe.models.global_view import gather_global

    cfg, engine = _build(CASES["token_all_targets"])
    _randomize(engine, "token_all_targets")
    ours = megamoe_logits_BSV(engine, sample_tokens_BS(TINY_VOCAB))
    engine2 = convert_both_ways(engine, cfg, root, lambda: _build(CASES["token_all_targets"]),
                                meta={"vocab_size": TINY_VOCAB})
    got = megamoe_logits_BSV(engine2, sample_tokens_BS(TINY_VOCAB))
    a, b = gather_global(engine.modules), gather_global(engine2.modules)
    lora = [k for k in a if ".lora." in k]
    return {"err": max_abs_diff(got, ours), "lora_keys": len(lora),
            "lora_same": all(torch.equal(a[k], b[k]) for k in lora)}


@pytest.mark.timeout(300)
def test_convert_carries_the_adapters_both_ways(tmp_path):
    r = run_distributed(convert_task, 1, str(tmp_path))[0]
    assert r["lora_keys"] == 3 * 2 * 4 * 2 and r["lora_same"]
    assert r["err"] < 1e-6, r["err"]


@pytest.mark.timeout(700)
@pytest.mark.parametrize("field,value,match", [
    ("lora_targets", ["qkv", "fc1"], r"mor\.lora_targets: \['fc1'\] adapt dense FFNs"),
    ("lora_alpha", 0, r"mor\.lora_alpha: 0"),
])
def test_remote_config_refuses_adapters_it_cannot_run(field, value, match, results, tmp_path):
    """fc1 on the MoE pool of `expert_kv_moe_pool`, α = 0: refused naming the field."""
    from megamoe.checkpoint.hf import import_hf

    bad = copy_with_config(os.path.join(results[0], "expert_kv_moe_pool"), tmp_path / "bad",
                           {f"mor.{field}": value})
    with pytest.raises(ValueError, match=match):
        import_hf(bad)
