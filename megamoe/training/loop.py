"""The training loop run by every rank: data → train_step → metrics → callbacks, periodic
validation, a final checkpoint and `summary.json`.

The loop knows no model family: the family record (megamoe.models.registry) builds the chunks,
its task collates and computes the loss, counts the units (tokens or samples) and FLOPs, and adds
its own step metrics and after-step hooks; the engine (megamoe.engines.base protocol) runs the
steps and hands out the checkpoint state."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from megamoe.checkpoint.load import load_newest
from megamoe.checkpoint.save import save_checkpoint
from megamoe.models.registry import family_datasets
from megamoe.data.checks import model_vocab_size
from megamoe.data.loader import DataLoader, make_loader
from megamoe.engines.megatron import build_engine as build_megatron_engine
from megamoe.models.lm.model import non_causal_routers
from megamoe.models.vocab import describe_vocab
from megamoe.moe.experts.choice import resolve_experts
from megamoe.training import metrics as M
from megamoe.training.callbacks import (JsonlCallback, ProgressCallback, TensorBoardCallback,
                                        json_text)
from megamoe.training.preemption import StopRequest
from megamoe.training.speed import SpeedMonitor

PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)


def build_engine(cfg, vocab_size: int, device: torch.device):
    """The engine `train.engine` names, with its optimizer."""
    if cfg.train.engine == "deepspeed":
        from megamoe.engines.deepspeed import build_engine as build_deepspeed_engine

        return build_deepspeed_engine(cfg, vocab_size, device)
    return build_megatron_engine(cfg, vocab_size, device)


def check_causality(cfg, family, chunks) -> list[str]:
    """The non-causal routers of the built model (for the start-of-run warning); the family's
    checks refuse them in a causal model unless the config opts in."""
    for check in family.launch_checks:
        check(cfg)
    return non_causal_routers(chunks) if family.causal else []


def loader_for(engine, dataset, consumed_samples: int = 0) -> DataLoader:
    """This DP rank's loader over `dataset`, collated by the family's task."""
    t, dp = engine.cfg.train, engine.grid.dp
    return make_loader(dataset, engine.task.collate, global_batch_size=t.global_batch_size,
                       micro_batch_size=t.micro_batch_size, dp_rank=dp.rank(),
                       dp_size=dp.size(), consumed_samples=consumed_samples)


def evaluate(engine, dataset, iters: int) -> tuple[float, dict]:
    """(mean loss per unit, {accuracy} where the task counts correct predictions) over the
    first `iters` global batches of `dataset` (the same batches at every validation)."""
    loader, t = loader_for(engine, dataset), engine.cfg.train
    total: dict = {}
    for i in range(iters):
        stats = engine.eval_step(loader.peek(i * t.global_batch_size))
        total = {k: total.get(k, 0.0) + v for k, v in stats.items()}
    per = getattr(engine.task, "accuracy_per", "units")   # vlm: exact answers per question
    extra = ({"accuracy": M.global_mean(total, engine.grid, "correct", per)}
             if "correct" in total else {})
    return M.global_loss(total, engine.grid), extra


def train(cfg, device: torch.device, stop: StopRequest | None = None) -> dict:
    """Train as configured; returns the summary (identical on every rank). `stop` is the
    process's StopRequest when the caller installed it before start-up (a signal received
    while the model is built then stops the run before its first step)."""
    t, rank0 = cfg.train, (not dist.is_initialized() or dist.get_rank() == 0)
    stop = stop or StopRequest()
    if stop.agreed():
        return _stopped_before_training(stop, rank0, "start-up")
    train_ds, valid_ds, data_vocab = family_datasets(cfg)
    vocab = model_vocab_size(cfg, data_vocab)
    engine = build_engine(cfg, vocab, device)
    family, task = engine.family, engine.task
    non_causal = check_causality(cfg, family, engine.modules)
    resumed = resume(cfg, engine, rank0)
    if engine.step >= t.steps:
        if rank0:
            print(f"[megamoe] nothing to do: the run is at step {engine.step} "
                  f"(train.steps={t.steps})", flush=True)
        return {"steps": engine.step, "nothing_to_do": True}
    loader = loader_for(engine, train_ds, engine.consumed_samples)
    if engine.data_state:
        loader.load_state_dict(engine.data_state)
    total_params, active_params = family.parameter_counts(cfg, vocab)
    flops_unit, peak = family.flops_per_unit(cfg, vocab), _peak_flops(device)
    family_metrics = (family.step_metrics(cfg, engine.modules, engine.grid, vocab)
                      if family.step_metrics else None)
    callbacks = []
    if rank0:
        callbacks.append(ProgressCallback(t.steps, cfg.run.log_interval, cfg.run.progress,
                                          unit="tok" if family.unit == "token" else "img"))
        # records past the step training continues from are dropped: they are re-done
        callbacks.append(JsonlCallback(os.path.join(cfg.run.dir, "metrics.jsonl"), engine.step))
        if cfg.run.tensorboard:
            callbacks.append(TensorBoardCallback(os.path.join(cfg.run.dir, "tensorboard"),
                                                 purge_step=engine.step + 1 if resumed else None))
    info = {"layout": engine.dims.describe() + (f" under DeepSpeed ZeRO-{t.zero_stage}"
                                                if t.engine == "deepspeed" else ""),
            "parameters": f"{total_params:,} total, "
            f"{active_params:,} active per {family.unit}", "run dir": cfg.run.dir}
    experts = resolve_experts(cfg, device.type) if cfg.model.moe.num_experts else None
    if experts:   # model.moe.experts, `auto` resolved for this device
        info["experts"] = f"{experts[0]} ({experts[1]})"
    if engine.padded_vocab_size is not None:
        info["vocab"] = describe_vocab(vocab, engine.padded_vocab_size,
                                       cfg.model.make_vocab_size_divisible_by, engine.dims.tensor)
    if family.describe:
        info.update(family.describe(cfg, vocab))
    if hasattr(train_ds, "entropy_rate"):
        info["corpus entropy rate"] = f"{train_ds.entropy_rate:.4f} nats/token"
    if resumed:
        info["resumed from"] = f"{resumed} (step {engine.step})"
        schedule = replan_schedule(cfg, engine.scheduler, engine.step)
        if schedule:
            info["LR schedule"] = schedule
    if non_causal:
        info["WARNING"] = f"non-causal routers in a causal decoder (opted in): {non_causal}"
    for cb in callbacks:
        cb.on_start(info)

    first_loss = last_loss = val_loss = None
    losses, tokens_per_step = [], t.global_batch_size * task.units_per_sample()
    if stop.agreed():
        return _stopped_before_training(stop, rank0, f"start-up (at step {engine.step})")
    start, first_step = time.perf_counter(), engine.step + 1
    pending = AsyncSaves(t.async_save)
    speed = SpeedMonitor(t.steps)
    streams = M.moe_streams(engine.moe_layers)     # an encoder's MoE layers, logged apart
    for step in range(first_step, t.steps + 1):
        t0 = time.perf_counter()
        mbs = loader.step_batches()
        stats = engine.train_step(mbs)
        engine.consumed_samples, engine.data_state = loader.consumed_samples, loader.state_dict()
        loss = M.global_loss(stats, engine.grid)
        load = M.expert_load(engine.moe_layers, cfg.model.num_layers, cfg.model.moe.num_experts,
                             streams=streams)
        router = M.router_losses(cfg, engine.pg, len(mbs), streams)
        router.update(M.routing_stats(engine.moe_layers))
        if cfg.model.moe.fp8.recipe != "none":
            router.update(M.fp8_counters(engine.moe_layers, cfg.model.num_layers, streams))
        step_flops = flops_unit
        if family_metrics is not None:
            router.update(family_metrics.read(tokens_per_step))
            step_flops = family_metrics.flops_per_unit(router) or flops_unit
        dt = time.perf_counter() - t0
        m = {"loss": loss, "lr": stats["lr"], "grad_norm": stats["grad_norm"],
             "tokens_per_s": tokens_per_step / dt, "imbalance": M.imbalance(load),
             "mfu": (step_flops * tokens_per_step / dt / (peak * engine.dims.world_size))
             if peak else None,
             "expert_load": {key: row for key, row in load.items() if row.sum() > 0},
             **router}
        m.update(M.data_counts(loader.metrics(), engine.grid))   # bad samples, all ranks
        m.update(speed.update(step, tokens_per_step,
                              engine.consumed_samples * task.units_per_sample()))
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping before saving")
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        losses.append(loss)
        for cb in callbacks:
            cb.on_step(step, m)
        if t.eval_interval and t.eval_iters and step % t.eval_interval == 0 and step < t.steps:
            val_loss, val_extra = evaluate(engine, valid_ds, t.eval_iters)
            for cb in callbacks:
                cb.on_eval(step, val_loss, val_extra)
        exit_now = t.exit_interval and step % t.exit_interval == 0 and step < t.steps
        pending.finish_ready()
        if stop.agreed() or exit_now:
            pending.finish_all()
            path = _save(cfg, engine)
            if rank0:
                why = "train.exit_interval" if exit_now else f"{stop.signal or 'stop'} received"
                print(f"[megamoe] {why}: saved {path} at step {step}; exiting", flush=True)
            return {"steps": step, "stopped": True, "checkpoint": path}
        if t.save_interval and step % t.save_interval == 0 and step < t.steps:
            _save(cfg, engine, pending.queue)
    wall = time.perf_counter() - start
    val_extra = {}
    if t.eval_iters:
        val_loss, val_extra = evaluate(engine, valid_ds, t.eval_iters)
        for cb in callbacks:
            cb.on_eval(t.steps, val_loss, val_extra)
    for cb in callbacks:
        cb.on_final_save(t.steps, os.path.join(cfg.run.dir, "checkpoints"))
    pending.finish_all()
    checkpoint = _save(cfg, engine)
    losses = losses or [float("nan")]
    summary = {
        "steps": t.steps, "first_loss": first_loss, "last_loss": last_loss,
        "last10_mean_loss": sum(losses[-10:]) / len(losses[-10:]), "val_loss": val_loss,
        **{f"val_{k}": v for k, v in val_extra.items()},
        "tokens_per_s": (t.steps - first_step + 1) * tokens_per_step / wall, "wall_s": wall,
        "resumed_from_step": first_step - 1,
        "layout": engine.dims.describe(), "world_size": engine.dims.world_size,
        "parameters_total": total_params, "parameters_active": active_params,
        "experts": experts[0] if experts else None,
        "entropy_rate": getattr(train_ds, "entropy_rate", None), "checkpoint": checkpoint,
    }
    if rank0:
        with open(os.path.join(cfg.run.dir, "summary.json"), "w") as f:
            f.write(json_text(summary, indent=2))
        for cb in callbacks:
            cb.on_end(summary)
    return summary


def _stopped_before_training(stop: StopRequest, rank0: bool, where: str) -> dict:
    """A stop agreed before the first step: nothing was trained, so nothing is saved."""
    if rank0:
        print(f"[megamoe] {stop.signal or 'stop'} received during {where}: exiting before "
              f"training (nothing new to save)", flush=True)
    return {"steps": None, "stopped": True, "checkpoint": None}


def _save(cfg, engine, async_queue=None) -> str:
    return save_checkpoint(os.path.join(cfg.run.dir, "checkpoints"), engine,
                           {}, keep_last=cfg.train.keep_last,
                           async_queue=async_queue)


class AsyncSaves:
    """Interval checkpoints written in the background (`train.async_save`); committed in order
    once every rank's writer is done (checked after each step), and always before a
    synchronous save (stop, exit, end of training)."""

    def __init__(self, enabled: bool):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False) if enabled else None

    def finish_ready(self) -> None:
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def finish_all(self) -> None:
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)


def resume(cfg, engine, rank0: bool) -> str | None:
    """Load the checkpoint `train.resume` names (auto: this run's newest loadable one; a
    fresh start when it has none). An explicit path must hold a loadable checkpoint."""
    choice = cfg.train.resume
    if choice == "none":
        return None
    log = (lambda msg: print(msg, flush=True)) if rank0 else (lambda *_: None)
    path = cfg.run.dir if choice == "auto" else choice
    if choice == "auto" and not os.path.isdir(os.path.join(path, "checkpoints")):
        return None
    return load_newest(engine, path, explicit=choice != "auto", log=log)


def replan_schedule(cfg, scheduler, step: int) -> str | None:
    """After a resume, when the checkpoint's LR schedule ends before `train.steps`: with
    `train.reset_schedule` a new decay from `train.lr` at `step` to `train.min_lr` at
    `train.steps` (no warmup); without it, the LR stays at its minimum past the old end, and
    the returned warning says so. Once re-planned, the saved schedule ends
    at `train.steps`, so later resumes of the same run leave it alone."""
    t = cfg.train
    if scheduler is None or t.lr_schedule == "constant" or t.steps <= scheduler.lr_decay_steps:
        return None
    old_end = scheduler.lr_decay_steps
    if t.reset_schedule:
        scheduler.lr_warmup_steps = step       # get_lr returns max_lr at the warmup's end
        scheduler.lr_decay_steps = t.steps    # > step: a finished run never gets here
        scheduler.step(increment=0)            # the next step's LR from the new plan
        return (f"re-planned (train.reset_schedule): {t.lr:.3g} at step {step} decaying to "
                f"{t.min_lr:.3g} at step {t.steps} (the checkpoint's ended at step {old_end})")
    return (f"WARNING: train.steps={t.steps} but the checkpoint's LR schedule ends at step "
            f"{old_end}: the LR stays at train.min_lr ({t.min_lr:.3g}) after it; set "
            "train.reset_schedule=true to decay again from train.lr over the new steps")
