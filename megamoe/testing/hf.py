"""Helpers of the Hugging Face export tests (tests/unit/test_hf_*.py, tests/e2e/test_convert.py).

A test builds a tiny megamoe model (`build_tiny`, `randomize`), exports it (`export_engine`),
loads the folder with transformers (`load_hf`) and compares logits on one batch
(`hf_logits_err`, TOL); `reexport` and `load_imported` check export → import → export and the
imported model; `imported_task` (a pool task) imports a folder under a parallel layout, and
`imported_errors` compares that with a reference, as is and with a control edit;
`copy_with_config` makes a folder with edited config.json fields (refusal tests).

Shapes: B batch, S sequence, V vocabulary, E experts.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from megamoe.testing.hf_generate import greedy_matches_recompute  # noqa: F401  (re-exported)
from megamoe.testing.parity import TINY_VOCAB, tiny_config
from megamoe.testing.pool import run_distributed

TOL = 1e-4                   # max |Δ logits| of transformers vs megamoe (DESIGN.md)
SHARD_BYTES = 64 * 1024      # the tiny models are ~0.2-0.5 MB: several shards


def sample_tokens_BS(vocab: int, B: int = 2, S: int = 16) -> torch.Tensor:
    """The batch every HF test compares logits on: seeded, so both sides see the same tokens."""
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(0))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def same_tensors(a: dict, b: dict) -> bool:
    """The same names and bit-identical tensors."""
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- megamoe side ------------------------------------------------------------------------------

def build_tiny(overrides):
    """(cfg, engine) of a tiny config on this process group's ranks (1 outside a pool), without
    optimizer or DDP; vocabulary: the config's (an imported folder's) or TINY_VOCAB."""
    from megamoe.engines.megatron import build_engine

    world = dist.get_world_size() if dist.is_initialized() else 1
    cfg = tiny_config([*overrides, f"parallel.world_size={world}"])
    vocab = cfg.model.vocab_size or TINY_VOCAB
    return cfg, build_engine(cfg, vocab, torch.device("cpu"), with_optimizer=False, ddp=False)


@torch.no_grad()
def randomize(engine, race_threshold: float | None = None, seed: int = 1) -> torch.Generator:
    """Every parameter random (norm weights 1 + 0.2·N(0, 1), the rest 0.1·N(0, 1)) and every
    MoE selection bias 0.3·N(0, 1), so that a misplaced tensor shows in the logits; Expert
    Race routers' τ_ema set to `race_threshold` (with 7 updates behind it), DiffMoE's τ_e to
    0.5 (inside the predictor's σ range: some pairs routed, not all). Returns the generator,
    for the caller's further draws."""
    from megamoe.models.lm.model import moe_layers

    g = torch.Generator().manual_seed(seed)
    for name, p in engine.modules[0].named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    for layer in moe_layers(engine.modules):
        router = layer.router
        if getattr(router, "selection_bias", None) is not None:
            router.selection_bias.copy_(0.3 * torch.randn(router.selection_bias.shape,
                                                          generator=g))
        if hasattr(router, "expert_threshold"):
            router.expert_threshold.fill_(0.5)
        if race_threshold is not None and hasattr(router, "threshold_ema"):
            router.threshold_ema.fill_(race_threshold)
            router.threshold_updates.fill_(7.0)
    return g


@torch.no_grad()
def megamoe_logits_BSV(engine, tokens_BS):
    """Eval-mode logits [B, S, V] on every rank, V the unpadded vocabulary (the padded ids'
    logits are -inf: megamoe.models.vocab); under TP the output layer is vocab-parallel: the
    shards are gathered."""
    model = engine.modules[0]
    model.eval()
    S = tokens_BS.shape[1]
    logits_BSV = model(tokens_BS, torch.arange(S).expand_as(tokens_BS), None)
    tp = engine.pg.tp
    if tp.size() > 1:
        parts = [torch.empty_like(logits_BSV) for _ in range(tp.size())]
        dist.all_gather(parts, logits_BSV.contiguous(), group=tp)
        logits_BSV = torch.cat(parts, dim=-1)
    return logits_BSV[..., :engine.vocab_size]


@torch.no_grad()
def context_logits_BSV(engine, cfg, tokens_BS):
    """Eval-mode logits [B, S, V] with the config's synthetic routing context (modality ids,
    timesteps), as the remote code derives it from the tokens; one rank."""
    from megamoe.models.lm.model import lm_context

    model = engine.modules[0]
    model.eval()
    logits_BSV = model(tokens_BS, torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS), None,
                       context=lm_context({"tokens": tokens_BS}, cfg))
    return logits_BSV[..., :engine.vocab_size]


def export_engine(engine, cfg, out: str, **export_kwargs) -> dict:
    """Export the engine's global tensors, router buffers included, to `out`; returns them."""
    from megamoe.checkpoint.hf import export_hf
    from megamoe.checkpoint.router_state import gather_router_buffers
    from megamoe.models.global_view import gather_global

    tensors = {**gather_global(engine.modules), **gather_router_buffers(engine.modules)}
    export_hf(tensors, cfg, out, **export_kwargs)
    return tensors


# ---- transformers side -------------------------------------------------------------------------

def load_hf(hf_dir: str):
    """transformers' model of the folder (remote code allowed, nothing downloaded), in eval
    mode, and what it could not load: {kind: names}, only non-empty kinds (must be {})."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, trust_remote_code=True, local_files_only=True,
        output_loading_info=True)
    return model.eval(), {k: v for k, v in info.items() if v}


@torch.no_grad()
def hf_logits_BSV(model, tokens_BS, **kwargs):
    """transformers' logits [B, S, V] in fp32; `kwargs` go to the forward (routing context)."""
    return model(input_ids=tokens_BS, **kwargs).logits.float()


@torch.no_grad()
def hf_logits_err(hf, ours_BSV, tokens_BS, **kwargs) -> float:
    """max |Δ| of transformers' logits (no KV cache) from megamoe's `ours_BSV`."""
    return max_abs_diff(hf_logits_BSV(hf, tokens_BS, use_cache=False, **kwargs), ours_BSV)


# ---- round trips -------------------------------------------------------------------------------

def reexport(out: str, tensors: dict, files=("config.json",), **export_kwargs):
    """Import the folder `out` and export it again to `out`-again. Returns (checks, the imported
    overrides, the imported tensors); checks: `import_same` (the imported tensors are
    `tensors`), `reexport_same` (both folders hold the same tensors), `same_<file>` per file of
    `files` (the same JSON)."""
    from megamoe.checkpoint.global_load import unstack_layers
    from megamoe.checkpoint.hf import export_hf, import_hf, read_safetensors

    hf_overrides, back = import_hf(out)
    checks = {"import_same": same_tensors(unstack_layers(tensors), unstack_layers(back))}
    again = out + "-again"
    export_hf(back, tiny_config(hf_overrides), again, **export_kwargs)
    checks["reexport_same"] = same_tensors(read_safetensors(out), read_safetensors(again))
    for fname in files:
        with open(os.path.join(out, fname)) as a, open(os.path.join(again, fname)) as b:
            checks[f"same_{fname}"] = json.load(a) == json.load(b)
    return checks, hf_overrides, back


def copy_with_config(src: str, dst, changes: dict) -> str:
    """A copy of the folder `src` at `dst` whose config.json has `changes` applied: {"a.b": v}
    sets field b of the nested dict a (its other fields kept). Returns the copy's path."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    for dotted, value in changes.items():
        *parents, field = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[field] = value
    with open(path, "w") as f:
        json.dump(config, f)
    return str(dst)


def load_imported(hf_overrides, tensors: dict, build=build_tiny):
    """(cfg, engine, number of router buffers loaded) of a fresh `build(hf_overrides)` engine
    holding the imported tensors."""
    from megamoe.checkpoint.global_load import load_global_into
    from megamoe.checkpoint.router_state import load_router_buffers

    cfg, engine = build(hf_overrides)
    load_global_into(engine.modules, tensors)
    return cfg, engine, load_router_buffers(engine.modules, tensors)


def convert_both_ways(engine, cfg, root: str, build, meta=None):
    """`megamoe convert` both ways: save `engine` as a checkpoint under `root`, export it
    (--to hf), import the folder (--from hf) and load that step-0 checkpoint into `build()`'s
    fresh engine, which is returned."""
    from megamoe.commands import convert
    from megamoe.checkpoint.load import load_checkpoint
    from megamoe.checkpoint.save import save_checkpoint

    step_dir = save_checkpoint(os.path.join(root, "ckpt"), engine, meta or {}, config=cfg)
    out = convert.to_hf(step_dir, os.path.join(root, "hf"), log=lambda *_: None)
    imported = convert.from_hf(out, os.path.join(root, "imported"), log=lambda *_: None)
    _, engine2 = build()
    load_checkpoint(engine2, imported, load_optimizer=False)
    return engine2


# ---- importing under a parallel layout (pool tasks) --------------------------------------------

def _expert_axis(key: str) -> int:
    """The expert axis of an `experts.experts.*` tensor: 1 when layers are stacked [L, E, ...]."""
    from megamoe.checkpoint.global_load import LAYER_PREFIX

    stacked = key.startswith(LAYER_PREFIX) and not key[len(LAYER_PREFIX):].split(".")[0].isdigit()
    return 1 if stacked else 0


def _roll_experts(tensors: dict) -> dict:
    """Every expert moved to the next index, away from its router row."""
    return {k: v.roll(1, dims=_expert_axis(k)) if ".experts.experts." in k else v
            for k, v in tensors.items()}


def _zero_adapters(tensors: dict) -> dict:
    """Every per-recursion LoRA adapter's B set to 0 (the adapters add nothing)."""
    return {k: torch.zeros_like(v) if ".lora." in k and k.endswith(".B") else v
            for k, v in tensors.items()}


CONTROLS = {"roll_experts": _roll_experts, "zero_adapters": _zero_adapters}


def imported_task(hf_dir, overrides=(), control=None):
    """Pool task: import an HF folder (router buffers included) into a megamoe model of this
    pool's layout; logits on rank 0. `control`: a name of CONTROLS, an edit of the imported
    tensors that must change the logits."""
    from megamoe.checkpoint.hf import import_hf

    hf_overrides, tensors = import_hf(hf_dir)
    if control is not None:
        tensors = CONTROLS[control](tensors)
    _, engine, _ = load_imported([*hf_overrides, *overrides], tensors)
    logits_BSV = megamoe_logits_BSV(engine, sample_tokens_BS(engine.vocab_size))
    return logits_BSV if dist.get_rank() == 0 else None


def load_and_gather_task(hf_dir, overrides=()):
    """Pool task: load an imported folder into this pool's layout and gather it back; the max
    |difference| of every tensor."""
    from megamoe.checkpoint.global_load import load_global_into, unstack_layers
    from megamoe.checkpoint.hf import import_hf
    from megamoe.models.global_view import gather_global

    hf_overrides, tensors = import_hf(hf_dir)
    _, engine = build_tiny([*hf_overrides, *overrides])
    load_global_into(engine.modules, tensors)
    want, got = unstack_layers(tensors), unstack_layers(gather_global(engine.modules))
    assert sorted(want) == sorted(got), sorted(set(want) ^ set(got))
    return max(max_abs_diff(want[k], got[k]) for k in want)


def imported_errors(hf_dir: str, layout: list, ours_BSV, control: str) -> tuple[float, float]:
    """max |Δ| from `ours_BSV` of the folder imported on 2 ranks under `layout`: as it is, and
    with the `control` edit (see CONTROLS)."""
    got_BSV = run_distributed(imported_task, 2, hf_dir, layout)[0]
    edited_BSV = run_distributed(imported_task, 2, hf_dir, layout, control=control)[0]
    return max_abs_diff(got_BSV, ours_BSV), max_abs_diff(edited_BSV, ours_BSV)
