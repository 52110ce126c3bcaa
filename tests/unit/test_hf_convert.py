"""Hugging Face export/import (megamoe.checkpoint.hf).

transformers loads the export (Mixtral, Qwen2-MoE) with logits equal to megamoe's, and a broken
layout (KV heads swapped in one layer) fails that check; the exported tokenizer encodes like
megamoe's; export → import → export is the identity; a randomly initialised transformers Mixtral
imports into megamoe (1 rank, EP2, TP2) with equal logits, and misplaced experts fail that check;
unsupported folders are refused naming the field. Qwen3-MoE, remote code and which family a
config gets: test_hf_families.py.
"""

import json
import os

import pytest
import torch

from megamoe.testing.hf import (
    SHARD_BYTES, TOL, build_tiny, hf_logits_BSV, imported_task, load_and_gather_task, load_hf,
    max_abs_diff, megamoe_logits_BSV, sample_tokens_BS,
)
from megamoe.testing.parity import TINY_VOCAB, tiny_config
from megamoe.testing.pool import run_distributed

MIXTRAL = ["model.num_layers=2", "model.init_method_std=0.1"]
QWEN2MOE = ["model.add_qkv_bias=true", "model.moe.shared_expert_ffn_hidden_size=32",
            "model.moe.shared_expert_gate=true", "model.moe.layer_freq=2",
            "model.tie_embeddings=true", "model.init_method_std=0.1"]


def export_task(overrides, out_dir, tokenizer=None):
    """Export a megamoe model; compare transformers' logits with megamoe's, and with a control
    that swaps layer 0's two KV heads in the loaded HF model."""
    from megamoe.checkpoint.hf import export_hf
    from megamoe.models.global_view import gather_global

    cfg, engine = build_tiny(overrides)
    tensors = gather_global(engine.modules)
    export_hf(tensors, cfg, out_dir, tokenizer=tokenizer, max_shard_bytes=SHARD_BYTES)
    tokens_BS = sample_tokens_BS(TINY_VOCAB)
    ours = megamoe_logits_BSV(engine, tokens_BS)
    hf, _ = load_hf(out_dir)
    err = max_abs_diff(hf_logits_BSV(hf, tokens_BS), ours)
    with torch.no_grad():
        k = hf.model.layers[0].self_attn.k_proj.weight
        k.copy_(torch.cat(k.chunk(2, dim=0)[::-1]))
    control = max_abs_diff(hf_logits_BSV(hf, tokens_BS), ours)
    return {"err": err, "control": control, "scale": ours.abs().max().item(),
            "architecture": type(hf).__name__, "tensors": tensors}


# ---- export ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from megamoe.data.tokenizer import train_sentencepiece

    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    text = ["a cab fed a bad face", "dead beef ace cafe bead", "fade deface add decade"] * 20
    return train_sentencepiece(text, prefix, 40).path


@pytest.fixture(scope="module")
def mixtral_export(tmp_path_factory, sp_model):
    out = str(tmp_path_factory.mktemp("export") / "mixtral")
    return out, run_distributed(export_task, 1, MIXTRAL, out, tokenizer=sp_model)[0]


@pytest.fixture(scope="module")
def qwen2moe_export(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "qwen2moe")
    return out, run_distributed(export_task, 1, QWEN2MOE, out)[0]


def _config(out) -> dict:
    """config.json without the special-token ids (written only with a tokenizer)."""
    with open(os.path.join(out, "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.endswith("_token_id")}


def _shards(out):
    return sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,architecture", [("mixtral_export", "MixtralForCausalLM"),
                                                 ("qwen2moe_export", "Qwen2MoeForCausalLM")])
def test_transformers_loads_the_export_with_equal_logits(family, architecture, request):
    out, r = request.getfixturevalue(family)
    assert r["architecture"] == architecture
    assert r["err"] < TOL, r["err"]
    assert r["scale"] > 0.1                    # logits are not trivially small
    assert r["control"] > 100 * TOL            # a layout error shows
    shards = _shards(out)
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)


@pytest.mark.timeout(300)
def test_qwen2moe_export_expresses_dense_layers_and_tied_embeddings(qwen2moe_export):
    out, _ = qwen2moe_export
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["mlp_only_layers"] == [1, 3] and config["norm_topk_prob"] is True
    assert config["tie_word_embeddings"] is True and config["qkv_bias"] is True


@pytest.mark.timeout(300)
def test_tokenizer_files_load_and_encode_like_megamoe(mixtral_export, sp_model):
    from transformers import AutoTokenizer, GenerationConfig

    from megamoe.data.tokenizer import SentencePieceTokenizer

    out, _ = mixtral_export
    ours, theirs = SentencePieceTokenizer(sp_model), AutoTokenizer.from_pretrained(out)
    for text in ["a cab fed a bad face", "  dead   beef\nace ", "ｃａｆｅ bead"]:
        assert theirs(text)["input_ids"] == ours.encode(text)
    assert GenerationConfig.from_pretrained(out).eos_token_id == ours.eos_id


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["mixtral_export", "qwen2moe_export"])
def test_export_import_export_is_the_identity(family, request, tmp_path):
    from megamoe.checkpoint.hf import export_hf, import_hf, read_safetensors

    out, r = request.getfixturevalue(family)
    hf_overrides, tensors = import_hf(out)
    assert sorted(tensors) == sorted(r["tensors"])
    for key, t in r["tensors"].items():
        assert torch.equal(tensors[key], t), key
    again = str(tmp_path / "again")
    export_hf(tensors, tiny_config(hf_overrides), again, max_shard_bytes=SHARD_BYTES)
    first, second = read_safetensors(out), read_safetensors(again)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert _shards(out) == _shards(again)
    assert _config(out) == _config(again)


# ---- import ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    """A randomly initialised transformers Mixtral (GQA, 4 experts), saved, and its logits."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, initializer_range=0.1,
                           max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    out = str(tmp_path_factory.mktemp("hf") / "mixtral")
    model.save_pretrained(out)
    return out, hf_logits_BSV(model, sample_tokens_BS(96))


@pytest.fixture(scope="module")
def imported_one_rank(hf_mixtral):
    return run_distributed(imported_task, 1, hf_mixtral[0])[0]


@pytest.mark.timeout(300)
def test_imported_mixtral_matches_transformers(hf_mixtral, imported_one_rank):
    _, reference = hf_mixtral
    assert reference.abs().max() > 0.1
    assert (imported_one_rank - reference).abs().max().item() < TOL


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [["parallel.expert=2"], ["parallel.tensor=2"]],
                         ids=["ep2", "tp2"])
def test_imported_model_under_parallel_layouts_matches_one_rank(layout, hf_mixtral,
                                                                imported_one_rank):
    got = run_distributed(imported_task, 2, hf_mixtral[0], layout)[0]
    assert got.shape == imported_one_rank.shape
    assert (got - imported_one_rank).abs().max().item() < TOL
    control = run_distributed(imported_task, 2, hf_mixtral[0], layout,
                              control="roll_experts")[0]
    assert (control - imported_one_rank).abs().max().item() > 100 * TOL


def test_import_reads_transformers_fused_expert_tensors(hf_mixtral, tmp_path):
    """transformers 5.x's in-memory names (experts fused into [E, 2F, D]) import like the
    per-expert files `save_pretrained` writes."""
    import shutil

    from safetensors.torch import save_file

    from megamoe.checkpoint.hf import import_hf

    state = {k: v.detach().clone() for k, v in load_hf(hf_mixtral[0])[0].state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(hf_mixtral[0], "config.json"), tmp_path)
    (ov_fused, fused), (ov_files, files) = import_hf(str(tmp_path)), import_hf(hf_mixtral[0])
    assert ov_fused == ov_files and sorted(fused) == sorted(files)
    assert all(torch.equal(fused[k], files[k]) for k in files)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("folder,layout", [("hf_mixtral", ["parallel.pipeline=2"]),
                                           ("qwen2moe_export", ["parallel.tensor=2"]),
                                           ("qwen2moe_export", ["parallel.expert=2"])],
                         ids=["mixtral-pp2", "qwen2moe-tp2", "qwen2moe-ep2"])
def test_load_global_into_any_layout_gathers_back_the_same_tensors(folder, layout, request):
    hf_dir = request.getfixturevalue(folder)[0]
    assert run_distributed(load_and_gather_task, 2, hf_dir, layout)[0] == 0.0


# ---- refusals ----------------------------------------------------------------------------------

def test_import_refuses_unsupported_folders(tmp_path, hf_mixtral):
    from safetensors.torch import save_file
    from transformers import Qwen2MoeConfig

    from megamoe.checkpoint.hf import import_hf, read_safetensors

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="config.json: model_type 'llama'"):
        import_hf(str(tmp_path / "llama"))
    Qwen2MoeConfig(use_sliding_window=True).save_pretrained(str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="use_sliding_window true"):
        import_hf(str(tmp_path / "qwen"))
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = read_safetensors(hf_mixtral[0])
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(open(os.path.join(hf_mixtral[0], "config.json")).read())
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe"
                                         r"\.experts\.3\.w2\.weight'"):
        import_hf(str(broken))


# ---- existing output folders -------------------------------------------------------------------

FOREIGN = {"README.md": "# my model card\n", ".gitattributes": "*.safetensors filter=lfs\n",
           ".git/HEAD": "ref: refs/heads/main\n", "notes/eval.txt": "mmlu 0.25\n"}


def _write_files(root, files: dict) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _modes(folder) -> dict:
    return {f: os.stat(os.path.join(folder, f)).st_mode & 0o777 for f in os.listdir(folder)}


def test_export_into_an_existing_folder_keeps_its_files_and_drops_stale_shards(
        mixtral_export, tmp_path):
    """Re-export a sharded folder (with a tokenizer) as one file, no tokenizer, into a copy that
    also holds a model card, a .git and the user's notes."""
    import shutil

    from megamoe.checkpoint.hf import export_hf, read_safetensors

    src, r = mixtral_export
    hub = tmp_path / "hub"
    shutil.copytree(src, hub)
    _write_files(hub, FOREIGN)
    tokenizer_files = sorted(f for f in os.listdir(src) if f.startswith("tokenizer"))
    export_hf(r["tensors"], tiny_config(MIXTRAL), str(hub))      # one file: 1 GiB shards
    assert all((hub / rel).read_text() == text for rel, text in FOREIGN.items())
    assert sorted(os.listdir(hub)) == sorted(
        [".git", ".gitattributes", "README.md", "notes", "config.json", "generation_config.json",
         "model.safetensors", *tokenizer_files])                 # shards and index removed
    want, got = read_safetensors(src), read_safetensors(str(hub))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    _, not_loaded = load_hf(str(hub))
    assert not_loaded == {}

    other = tmp_path / "other"                   # not a Hugging Face folder: refused …
    _write_files(other, {"data.bin": "x"})
    with pytest.raises(ValueError, match=f"{other}: exists and is not a Hugging Face model "
                                         "folder.*--force"):
        export_hf(r["tensors"], tiny_config(MIXTRAL), str(other))
    assert os.listdir(other) == ["data.bin"]
    export_hf(r["tensors"], tiny_config(MIXTRAL), str(other), force=True)   # … unless forced
    assert (other / "data.bin").read_text() == "x" and (other / "config.json").is_file()


def test_exported_files_have_the_mode_open_gives(mixtral_export, tmp_path):
    """0644 under umask 022 (safetensors alone writes 0600), 0640 under 027; into a new folder
    and into an existing one."""
    from megamoe.checkpoint.hf import export_hf

    tensors = mixtral_export[1]["tensors"]
    old = os.umask(0o022)
    try:
        for umask, want in ((0o022, 0o644), (0o027, 0o640)):
            os.umask(umask)
            out = tmp_path / f"umask{umask:o}"
            for _ in range(2):                   # new, then existing
                export_hf(tensors, tiny_config(MIXTRAL), str(out), max_shard_bytes=SHARD_BYTES)
                modes = _modes(out)
                assert len(modes) >= 4 and set(modes.values()) == {want}, modes
    finally:
        os.umask(old)


def import_task(src, out, force=False):
    """Pool task: `convert --from hf` into `out`."""
    from megamoe.commands import convert

    return convert.from_hf(src, out, force=force, log=lambda *_: None)


def test_import_refuses_an_existing_run_directory_unless_forced(hf_mixtral, tmp_path, capsys):
    """A run that trained to step 5 (config.yaml edited, metrics.jsonl) is left as it is by
    `convert --from hf` into it; --force replaces its config.yaml and checkpoints/ only."""
    import shutil

    from megamoe.cli import main

    run = tmp_path / "run"
    run_distributed(import_task, 1, hf_mixtral[0], str(run))
    ckpt = run / "checkpoints"
    shutil.copytree(ckpt / "step_0000000", ckpt / "step_0000005")
    (ckpt / "latest").write_text("step_0000005\n")
    with open(run / "config.yaml", "a") as f:
        f.write("# trained to step 5\n")
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "checkpoints/latest")}

    capsys.readouterr()
    assert main(["convert", "--from", "hf", hf_mixtral[0], str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megamoe: error: {run}: exists and is not empty") and "--force" in err
    assert err.count("\n") == 1
    assert {p: (run / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000000", "step_0000005"]

    path = run_distributed(import_task, 1, hf_mixtral[0], str(run), force=True)[0]
    assert path == str(ckpt / "step_0000000")
    assert (ckpt / "latest").read_text().strip() == "step_0000000"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000000"]
    assert "# trained" not in (run / "config.yaml").read_text()
    assert (run / "metrics.jsonl").read_text() == '{"step": 5}\n'
