"""Hugging Face export and import. `family_for` picks the first family that expresses the model
exactly: transformers' Mixtral (the foundation block), Qwen2-MoE (a gated shared expert, qkv
bias, dense layers), Qwen3-MoE (per-head QK-norm, dense layers); otherwise megamoe's own modeling
code travels in the folder (model_type "megamoe", `trust_remote_code=True`, `hf_megamoe`), which
runs every router family in its eval-mode routing (Megatron's capacity dropping and Expert
Race's PLR router included), and Mixture-of-Recursions decoders (`model.mor`, hf_mor; their
per-recursion LoRA adapters too). Only what that code cannot express either (`model.mor`
options it does not know) is refused, naming the field. The vit family exports through its
remote code (hf_vit); the vlm family to transformers' LLaVA where it expresses the model
exactly (hf_llava), else through its remote code (hf_vlm).

Not a family: OLMoE. Its q_norm/k_norm are one RMSNorm over the whole q (H·d) and k (G·d)
projection, mixing all heads' statistics; megamoe's QK-norm normalises each head's d channels
on its own (Megatron's q_layernorm), which no choice of weights turns into the other.

    export_hf({**gather_global(chunks), **gather_router_buffers(chunks)}, cfg, "out/hf")
    overrides, tensors = import_hf("out/hf")
    cfg = load_config(None, overrides)   # build the model, load_global_into, load_router_buffers

The folder holds `config.json`, `generation_config.json`, fp32 safetensors (shards of at most
`max_shard_bytes` with `model.safetensors.index.json`, or one `model.safetensors` when it fits)
and optionally the sentencepiece tokenizer (`hf_tokenizer`); a vlm's also the
CLIPImageProcessor settings of megamoe's pixels (preprocessor_config.json); every file with
the mode `open()` gives (0644 under umask 022). It is written whole into a temporary sibling
folder first, then renamed into place: a new `out_dir` at once; into an existing Hugging Face
folder file by file (renames only, config.json last), replacing the export's own files,
removing the weights and modeling code of an earlier export that this one does not write, and
keeping every other file (a model card, .gitattributes, .git/) — it is the user's. A non-empty
folder without config.json is refused unless `force` (it may be anything).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from megamoe.checkpoint import (
    hf_llava, hf_megamoe, hf_mixtral, hf_qwen2moe, hf_qwen3moe, hf_vit, hf_vlm,
)
from megamoe.checkpoint.global_load import stack_layers
from megamoe.checkpoint.hf_layout import DecoderShape, from_hf, to_hf
from megamoe.checkpoint.hf_tokenizer import write_tokenizer

EXACT = (hf_mixtral, hf_qwen2moe, hf_qwen3moe)       # tried in this order
FAMILIES = {f.MODEL_TYPE: f for f in (*EXACT, hf_megamoe, hf_vit, hf_llava, hf_vlm)}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
PREPROCESSOR = "preprocessor_config.json"     # the vlm family's image processor


# model families (megamoe.models.registry) with a Hugging Face mapping; the mapping lives here,
# above the model code, which never imports checkpoint code
MAPPED_MODEL_FAMILIES = ("lm", "vit", "vlm")


def family_for(cfg):
    """The first transformers family that expresses `cfg` exactly, else megamoe's remote code;
    ValueError naming every field that even the remote code cannot express, or the model family
    when it has no mapping at all."""
    model_family = getattr(cfg.model, "family", "lm")
    if model_family not in MAPPED_MODEL_FAMILIES:
        instead = ("export a diffusers pipeline instead: megamoe convert RUN --to diffusers"
                   if model_family == "dit" else "keep the megamoe checkpoint")
        raise ValueError(f"model.family {model_family!r}: no Hugging Face mapping (mapped: "
                         f"{', '.join(MAPPED_MODEL_FAMILIES)}); {instead}")
    if model_family == "vit":
        bad = hf_vit.problems(cfg)
        if bad:
            raise ValueError("cannot export to a Hugging Face model:\n  " + "\n  ".join(bad))
        return hf_vit
    if model_family == "vlm":
        return _vlm_family(cfg)
    for family in EXACT:
        if not family.problems(cfg):
            return family
    bad = hf_megamoe.problems(cfg)
    if bad:
        raise ValueError("cannot export to a Hugging Face model (Mixtral, Qwen2-MoE, Qwen3-MoE "
                         "or megamoe's remote code):\n  " + "\n  ".join(bad))
    return hf_megamoe


def _vlm_family(cfg):
    """LLaVA when it expresses the vlm exactly, else megamoe's remote code, else ValueError
    naming every field neither expresses."""
    if cfg.data.kind == "sounds":
        raise ValueError("data.kind 'sounds': no Hugging Face mapping for the audio model (its "
                         "encoder reads one-channel log-mel spectrograms, which LLaVA's image "
                         "processor does not make); keep the megamoe checkpoint")
    if not hf_llava.problems(cfg):
        return hf_llava
    bad = hf_vlm.problems(cfg)
    if bad:
        raise ValueError("cannot export to a Hugging Face model (LLaVA or megamoe's remote "
                         "code):\n  " + "\n  ".join(bad))
    return hf_vlm


def export_hf(tensors: dict, cfg, out_dir: str, *, tokenizer: str | None = None,
              max_shard_bytes: int = 2**30, force: bool = False) -> str:
    """Write `tensors` (global key → full tensor, `gather_global`'s format) of the model `cfg`
    describes as a folder `transformers.AutoModelForCausalLM.from_pretrained` loads (the vit
    family's: AutoModelForImageClassification; the vlm family's: AutoModelForImageTextToText).
    `force`: export into an existing non-empty folder that is not a Hugging Face folder too."""
    family = family_for(cfg)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: must be >= 1, got {max_shard_bytes}")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ValueError(f"{tokenizer}: sentencepiece model not found")
    check_export_dir(out_dir, force)
    if family is hf_vit:
        return _export_vit(tensors, cfg, out_dir, max_shard_bytes)
    if family in (hf_llava, hf_vlm):
        return _export_vlm(family, tensors, cfg, out_dir, tokenizer, max_shard_bytes)
    if "embedding.word_embeddings.weight" not in tensors:
        raise ValueError("tensors: no 'embedding.word_embeddings.weight'")
    vocab_size = tensors["embedding.word_embeddings.weight"].shape[0]
    if family is hf_megamoe:
        hf_megamoe.check_router_buffers(tensors, cfg)
    hf_tensors = to_hf(tensors, DecoderShape.from_config(cfg), family.NAMES)
    config = family.hf_config(cfg, vocab_size)
    tmp = _temp_sibling(out_dir)
    try:
        special = write_tokenizer(tokenizer, tmp, vocab_size) if tokenizer else {}
        config.update(special)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), dict(special))
        if family is hf_megamoe:
            hf_megamoe.write_code(tmp)
        _write_shards(hf_tensors, tmp, max_shard_bytes)
        _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _export_vit(tensors: dict, cfg, out_dir: str, max_shard_bytes: int) -> str:
    """The vit family's folder (megamoe.checkpoint.hf_vit): config, code, weights."""
    if "head.weight" not in tensors:
        raise ValueError("tensors: no 'head.weight'")
    hf_tensors = hf_vit.to_hf(tensors, cfg)
    config = hf_vit.hf_config(cfg, tensors["head.weight"].shape[0])
    tmp = _temp_sibling(out_dir)
    try:
        _write_json(os.path.join(tmp, "config.json"), config)
        hf_vit.write_code(tmp)
        _write_shards(hf_tensors, tmp, max_shard_bytes)
        _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _export_vlm(family, tensors: dict, cfg, out_dir: str, tokenizer: str | None,
                max_shard_bytes: int) -> str:
    """The vlm family's folder (LLaVA's, or megamoe's remote code): config, image processor,
    weights (and code)."""
    from megamoe.checkpoint.hf_clip import image_processor_fields

    if "embedding.word_embeddings.weight" not in tensors:
        raise ValueError("tensors: no 'embedding.word_embeddings.weight'")
    vocab_size = tensors["embedding.word_embeddings.weight"].shape[0]
    if family is hf_vlm:
        hf_megamoe.check_router_buffers(hf_llava.split(tensors)[2], cfg)
    hf_tensors = family.to_hf(tensors, cfg)
    config = family.hf_config(cfg, vocab_size)
    tmp = _temp_sibling(out_dir)
    try:
        special = write_tokenizer(tokenizer, tmp, vocab_size) if tokenizer else {}
        config["text_config"].update(special)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), dict(special))
        _write_json(os.path.join(tmp, PREPROCESSOR),
                    {"image_processor_type": "CLIPImageProcessor", **image_processor_fields(cfg)})
        if family is hf_vlm:
            hf_vlm.write_code(tmp)
        _write_shards(hf_tensors, tmp, max_shard_bytes)
        _commit(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def import_hf(hf_dir: str) -> tuple[list[str], dict]:
    """megamoe config overrides (architecture fields only: sequence length, data and training
    settings stay the recipe's) and global tensors (megamoe's keys, fp32) of a Mixtral,
    Qwen2-MoE, Qwen3-MoE, LLaVA or megamoe remote-code folder."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path}: not found (not a Hugging Face model folder)")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{config_path}: not a readable JSON object ({exc})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    family = FAMILIES[model_type]
    if family is hf_vit:
        overrides, shape = hf_vit.from_hf_config(hf_vit.read_config(hf_dir), config_path)
        return overrides, hf_vit.from_hf(read_safetensors(hf_dir), shape, hf_dir)
    if family is hf_llava:
        overrides, shape, text = hf_llava.from_hf_config(_auto_config(hf_dir), config_path)
        return overrides, hf_llava.from_hf(read_safetensors(hf_dir), overrides, shape, text,
                                           hf_dir)
    if family is hf_vlm:
        overrides, shape, tower = hf_vlm.from_hf_config(hf_vlm.read_config(hf_dir), config_path)
        return overrides, hf_vlm.from_hf(read_safetensors(hf_dir), shape, tower, hf_dir)
    config = (hf_megamoe.read_config(hf_dir) if family is hf_megamoe
              else _auto_config(hf_dir))
    overrides, shape = family.from_hf_config(config, config_path)
    tensors = from_hf(read_safetensors(hf_dir), shape, family.NAMES, hf_dir)
    if len(set(shape.moe_layers)) == 1 and shape.mor_unique is None:
        tensors = stack_layers(tensors)     # Megatron stacks layers when all have one kind
    return overrides, tensors


def _auto_config(hf_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir, local_files_only=True)


# ---- safetensors -------------------------------------------------------------------------------

def _write_shards(tensors: dict, out_dir: str, max_shard_bytes: int) -> None:
    """Greedy shards of at most `max_shard_bytes` (a larger single tensor gets its own)."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        t = t.detach().to(torch.float32).contiguous().clone()   # no shared storage on disk
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    _write_json(os.path.join(out_dir, INDEX),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def read_safetensors(hf_dir: str) -> dict:
    """Every tensor of the folder's safetensors file(s), as fp32."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
        files = [SINGLE]
    else:
        raise ValueError(f"{hf_dir}: no {SINGLE} or {INDEX} (only safetensors weights are read)")
    tensors = {}
    for fname in files:
        path = os.path.join(hf_dir, fname)
        if not os.path.isfile(path):
            raise ValueError(f"{index}: names {fname}, which is missing")
        tensors.update({k: v.float() for k, v in load_file(path).items()})
    return tensors


# ---- the folder --------------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_export_dir(out_dir: str, force: bool = False) -> None:
    """ValueError unless `out_dir` is new, empty, a Hugging Face folder (config.json) or
    `force`d: an export keeps an existing folder's other files, but should not land in a
    directory named by mistake."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    if (os.path.isdir(out_dir) and os.listdir(out_dir) and not force
            and not os.path.isfile(os.path.join(out_dir, "config.json"))):
        raise ValueError(f"{out_dir}: exists and is not a Hugging Face model folder (no "
                         "config.json); choose another folder, or pass --force to export into "
                         "it (its files are kept)")


def _temp_sibling(out_dir: str) -> str:
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _is_weights_or_code(name: str) -> bool:
    """A file of an export that must match its config.json: weights, index, modeling code
    (every family's: hf_vlm's include the LM's and the ViT's), image processor."""
    return (name in (SINGLE, INDEX, PREPROCESSOR, *hf_vlm.CODE_FILES)
            or bool(SHARD.fullmatch(name)))


def _default_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _commit(tmp: str, out_dir: str) -> None:
    """Move the export written in `tmp` to `out_dir` (see the module docstring)."""
    mode = _default_file_mode()
    written = sorted(os.listdir(tmp))
    for name in written:              # safetensors writes 0600
        os.chmod(os.path.join(tmp, name), mode)
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    for name in written:
        if name != "config.json":
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name not in written and _is_weights_or_code(name) and os.path.isfile(path):
            os.remove(path)           # an earlier export's
    os.replace(os.path.join(tmp, "config.json"), os.path.join(out_dir, "config.json"))
