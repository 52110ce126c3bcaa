"""`megamoe convert`: checkpoint ↔ Hugging Face folder, in this process on one rank.

A checkpoint saved under any layout loads into a one-rank model (checkpoints reshard), whose
global tensors are exported; an imported folder initialises a one-rank model that is saved as a
step-0 checkpoint, which any layout can then resume from (`--set train.resume=<dir>`).

Neither direction overwrites what it was not asked to: an import goes into a new or empty run
directory (`force`: replace an existing one's config.yaml and checkpoints/, keeping its other
files); an export keeps an existing folder's files that are not its own (hf.py). Both refuse
before loading anything.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from megamoe.checkpoint.load import CheckpointError, read_meta, resolve


def _one_rank():
    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.launch.spawn import free_port

    if not dist.is_initialized():
        os.environ.setdefault("MEGAMOE_DEVICE", "cpu")
        init_distributed(RankInfo(0, 1, 0, "convert"), "127.0.0.1", free_port())


def _single_rank_overrides() -> list[str]:
    return ["parallel.world_size=1", "parallel.tensor=1", "parallel.pipeline=1",
            "parallel.virtual_pipeline=null", "parallel.expert=1", "parallel.expert_tensor=null",
            "parallel.distributed_optimizer=false", "train.precision=fp32"]


def checkpoint_config(step_dir: str, overrides=()):
    from megamoe.config import load_config

    path = os.path.join(step_dir, "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(f"{step_dir}: no config.yaml (saved by an older megamoe?)")
    return load_config(path, [*_single_rank_overrides(), *overrides])


def load_one_rank(src: str, log=print):
    """(engine, cfg, step_dir, meta): the checkpoint `src` (a run directory, its checkpoints/
    root or one step directory, saved under any layout) loaded into a one-rank CPU model."""
    from megamoe.checkpoint.load import load_checkpoint
    from megamoe.engines.megatron import build_engine

    step_dir = resolve(src, log=log)
    if step_dir is None:
        raise CheckpointError(f"{src}: no complete checkpoint")
    meta = read_meta(step_dir)
    cfg = checkpoint_config(step_dir)
    _one_rank()
    engine = build_engine(cfg, int(meta["vocab_size"]), torch.device("cpu"),
                          with_optimizer=False, ddp=False)
    load_checkpoint(engine, step_dir, load_optimizer=False)
    return engine, cfg, step_dir, meta


def to_hf(src: str, out: str, *, max_shard_bytes: int = 2**30, force: bool = False,
          log=print) -> str:
    """Export the checkpoint `src` to the folder `out`; `force`: into an existing folder that
    is not a Hugging Face one too (its files kept)."""
    from megamoe.checkpoint.hf import check_export_dir, export_hf, family_for
    from megamoe.checkpoint.router_state import gather_router_buffers
    from megamoe.models.global_view import gather_global

    check_export_dir(out, force)
    engine, cfg, step_dir, meta = load_one_rank(src, log=log)
    tensors = {**gather_global(engine.modules), **gather_router_buffers(engine.modules)}
    out = export_hf(tensors, cfg, out, tokenizer=cfg.data.tokenizer,
                    max_shard_bytes=max_shard_bytes, force=force)
    model_type = family_for(cfg).MODEL_TYPE
    how = (" with its modeling code (load with trust_remote_code=True)"
           if model_type in ("megamoe", "megamoe_vit", "megamoe_vlm") else "")
    log(f"[megamoe] exported {step_dir} (step {meta['step']}) to {out} as {model_type}{how}")
    return out


def check_import_dir(out: str, force: bool = False) -> None:
    """ValueError unless `out` is new, an empty directory or `force`d: importing into a run
    directory would overwrite its config.yaml and move `latest` back to step 0."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"{out}: exists and is not empty (importing would overwrite its "
                         "config.yaml and move its latest checkpoint back to step 0); choose a "
                         "new directory, or pass --force to replace its config.yaml and "
                         "checkpoints/")


def from_hf(src: str, out: str, overrides=(), *, force: bool = False, log=print) -> str:
    """Import the Hugging Face folder `src` into the run directory `out` as a step-0
    checkpoint; `force`: replace an existing run's config.yaml and checkpoints/."""
    from megamoe.checkpoint.global_load import load_global_into
    from megamoe.checkpoint.hf import import_hf
    from megamoe.checkpoint.router_state import load_router_buffers
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.config import dump_config, load_config
    from megamoe.models.checks import check_config
    from megamoe.engines.megatron import build_engine

    check_import_dir(out, force)
    arch, tensors = import_hf(src)
    # the model's output size: the vocabulary, or the classes of a vit classifier
    vocab = tensors.get("embedding.word_embeddings.weight", tensors.get("head.weight")).shape[0]
    cfg = load_config(None, [*arch, *overrides, *_single_rank_overrides()])
    check_config(cfg, launch=False)
    _one_rank()
    engine = build_engine(cfg, vocab, torch.device("cpu"), with_optimizer=False, ddp=False)
    load_global_into(engine.modules, tensors)
    load_router_buffers(engine.modules, tensors)
    cfg.run.dir = out
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)   # only when forced
    dump_config(cfg, os.path.join(out, "config.yaml"))
    path = save_checkpoint(os.path.join(out, "checkpoints"), engine,
                           {"vocab_size": vocab, "imported_from": os.path.abspath(src)},
                           config=cfg)
    log(f"[megamoe] imported {src} into {path}; train from it with "
        f"--set train.resume={path}")
    return path
