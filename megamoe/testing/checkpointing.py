"""Pool tasks for checkpoint tests: train k steps under one layout and save; load under another
layout and continue. Data and tolerances as in megamoe.testing.parity."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.models.global_view import gather_global
from megamoe.testing.parity import (TINY_VOCAB, image_microbatches, image_source,
                                    rank_microbatches, tiny_config)

ADAM = ["train.optimizer=adamw", "train.lr=0.01", "train.min_lr=0.01"]


def _engine(overrides):
    from megamoe.engines.megatron import build_engine

    world = dist.get_world_size()
    cfg = tiny_config([f"parallel.world_size={world}", *ADAM, *overrides])
    return build_engine(cfg, TINY_VOCAB, torch.device("cpu"))


def _steps(engine, first: int, last: int) -> list:
    from megamoe.engines.megatron import train_step
    from megamoe.training.metrics import global_loss

    t, S = engine.cfg.train, engine.cfg.model.seq_length
    dp, r = engine.pg.dp.size(), engine.pg.dp.rank()
    images = image_source(engine.cfg) if engine.cfg.model.family != "lm" else None
    losses = []
    for step in range(first, last):
        if images is not None:
            mbs = image_microbatches(engine, images, step, None)
        else:
            mbs = rank_microbatches(step, r, dp, t.micro_batch_size, t.global_batch_size, S,
                                    TINY_VOCAB)
        losses.append(global_loss(train_step(engine, mbs), engine.pg))
        engine.consumed_samples += t.global_batch_size
    return losses


def train_and_save(overrides, root: str, steps: int):
    from megamoe.checkpoint.save import save_checkpoint

    engine = _engine(overrides)
    losses = _steps(engine, 0, steps)
    save_checkpoint(root, engine, {})
    return losses if dist.get_rank() == 0 else None


def load_and_continue(overrides, root: str, start: int, steps: int, load_optimizer=True,
                      router_buffers: bool = False):
    from megamoe.checkpoint.load import load_checkpoint, resolve

    engine = _engine(overrides)
    load_checkpoint(engine, resolve(root, log=lambda *_: None), load_optimizer=load_optimizer)
    assert engine.step == start
    losses = _steps(engine, start, start + steps)
    params = _global_state(engine, router_buffers)
    return (losses, params) if dist.get_rank() == 0 else None


def _global_state(engine, router_buffers: bool) -> dict:
    """The global parameters, and with `router_buffers` the routers' persistent buffers under
    their global keys (megamoe.checkpoint.router_state)."""
    params = gather_global(engine.modules)
    if router_buffers:
        from megamoe.checkpoint.router_state import gather_router_buffers

        params.update(gather_router_buffers(engine.modules))
    return params


def straight(overrides, steps: int, router_buffers: bool = False):
    engine = _engine(overrides)
    losses = _steps(engine, 0, steps)
    params = _global_state(engine, router_buffers)
    return (losses, params) if dist.get_rank() == 0 else None


def save_then_load(overrides, root: str, load_overrides, corrupt: str | None = None):
    """Save a model whose every tensor was randomised, load it into a differently seeded model
    (optionally another config, or after corrupting the files); return the names of state
    entries that differ, or the load error message."""
    from megamoe.checkpoint.load import CheckpointError, load_checkpoint, resolve
    from megamoe.checkpoint.save import save_checkpoint

    a = _engine(overrides)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for m in a.modules:
            for t in m.state_dict(keep_vars=True).values():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g))
    a.step, a.consumed_samples = 7, 56
    save_checkpoint(root, a, {})
    if corrupt and dist.get_rank() == 0:
        _corrupt(root, corrupt)
    dist.barrier()
    b = _engine(["run.seed=99", *load_overrides])
    try:
        load_checkpoint(b, resolve(root, log=lambda *_: None))
    except CheckpointError as exc:
        return str(exc)
    differ = []
    for ma, mb in zip(a.modules, b.modules):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert set(sa) == set(sb)
        for key in sa:
            if isinstance(sa[key], torch.Tensor) and not torch.equal(sa[key], sb[key]):
                differ.append(key)
    return {"differ": differ, "keys": sorted(sa), "step": b.step,
            "consumed": b.consumed_samples}


def _corrupt(root: str, how: str) -> None:
    import glob
    import os

    step_dir = sorted(glob.glob(os.path.join(root, "step_*")))[-1]
    if how == "truncate":
        for path in glob.glob(os.path.join(step_dir, "*.distcp")):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
    elif how == "metadata":
        with open(os.path.join(step_dir, "metadata.json"), "wb") as f:
            f.write(b"\x00garbage")


def checkpoint_logits(step_dir: str, tokens):
    """Logits of a saved checkpoint's model on `tokens` [B, S] over its (unpadded) vocabulary,
    gathered on rank 0."""
    from megamoe.commands.convert import checkpoint_config
    from megamoe.checkpoint.load import load_checkpoint, read_meta
    from megamoe.engines.megatron import build_engine

    cfg = checkpoint_config(step_dir)
    engine = build_engine(cfg, int(read_meta(step_dir)["vocab_size"]), torch.device("cpu"),
                          with_optimizer=False, ddp=False)
    load_checkpoint(engine, step_dir, load_optimizer=False)
    model = engine.modules[0]
    model.eval()
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, None)[..., :engine.vocab_size]


def check_continued(ref, got, done: int, atol: float) -> None:
    """A run resumed after `done` steps (`load_and_continue`'s (losses, params)) against the
    run that never stopped (`straight`'s): the later losses to 1e-5 relative, the parameters
    within `atol` (AssertionError otherwise)."""
    (ref_losses, ref_params), (losses, params) = ref, got
    for a, b in zip(ref_losses[done:], losses):
        assert abs(a - b) <= 1e-5 * abs(a), (ref_losses, losses)
    assert set(ref_params) == set(params)
    worst = max((ref_params[k] - params[k]).abs().max().item() for k in ref_params)
    assert worst <= atol, f"params differ by {worst:.2e} > {atol:.2e}"
