"""`megamoe eval RUN`: the newest complete checkpoint of a run (saved under any layout) loaded
on one CPU process and evaluated on the held-out split of its own data config.

- `lm`: the mean loss per token over `--iters` global batches of the validation split (the
  batches validation uses during training, so the figure is comparable with `val_loss` in
  summary.json) and its perplexity.
- `vlm`: closed-answer accuracy, its image-blind chance, the accuracy with every sample given
  its neighbour's image, caption exact match, and the expert-usage heat map per modality
  (megamoe.commands.eval_vlm); on video clips the time-reversed clips' accuracy instead of
  the caption figures (megamoe.commands.eval_video).
- `vit`: top-1 accuracy on the same batches next to the chance level (1 / classes), and the
  loss. With `--capacity C1,C2,… [--priority none,max]` also V-MoE's inference-capacity table
  (Riquelme et al. 2021, §4): every V-MoE layer evaluated at capacity ratio C with and without
  Batch Prioritized Routing — what each setting gives this model, no direction assumed.
- `dit`: the held-out denoising loss in 8 noise-level bins, and with `--judge` the class
  accuracy, KID and FID of generated samples, the expert load against t
  (megamoe.commands.eval_dit).

A progress line per batch goes to stderr; the last line of stdout is one JSON object of the
figures.
"""

from __future__ import annotations

import json
import math
import sys
import time

PRIORITY_MODES = ("none", "max", "sum")


def parse_capacities(text: str | None) -> list[float]:
    """`--capacity 1,0.5,0.25`: ratios in (0, ∞); ValueError naming the flag."""
    if text is None:
        return []
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--capacity: {item!r} is not a number (e.g. --capacity 1,0.5,0.25)")
        if not (0 < value < math.inf):
            raise ValueError(f"--capacity: {item} must be in (0, inf)")
        out.append(value)
    return out


def parse_priorities(text: str | None) -> list[str]:
    """`--priority none,max`: Batch Prioritized Routing modes; ValueError naming the flag."""
    if text is None:
        return []
    modes = [m.strip() for m in text.split(",")]
    unknown = [m for m in modes if m not in PRIORITY_MODES]
    if unknown or not modes:
        raise ValueError(f"--priority: unknown mode(s) {unknown} (choose from "
                         f"{', '.join(PRIORITY_MODES)})")
    return modes


def _sweep(engine, loader, iters: int, G: int, what: str) -> dict:
    """Summed eval stats over the first `iters` global batches, with a progress line each."""
    total: dict = {}
    start = time.perf_counter()
    for i in range(iters):
        stats = engine.eval_step(loader.peek(i * G))
        total = {k: total.get(k, 0.0) + v for k, v in stats.items()}
        done = time.perf_counter() - start
        print(f"[megamoe] eval{what} batch {i + 1}/{iters} | loss so far "
              f"{total['loss_sum'] / max(total['units'], 1):.4f} | "
              f"{total['units'] / done:.0f} {engine.task.unit}s/s", file=sys.stderr, flush=True)
    return total


def evaluate_checkpoint(src: str, *, iters: int | None = None, capacity: str | None = None,
                        priority: str | None = None, log=print, **dit_options) -> dict:
    """The figures of `src` (a run directory, its checkpoints/ root or a step directory);
    `dit_options`: evaluate_dit's keywords (judge, samples, steps, cfg_scale, seed,
    min_judge_accuracy), for dit runs only."""
    from megamoe.commands.convert import load_one_rank
    from megamoe.models.registry import family_datasets
    from megamoe.training import metrics as M
    from megamoe.training.loop import loader_for

    if iters is not None and iters < 1:
        raise ValueError(f"--iters={iters}: must be ≥ 1")
    capacities, priorities = parse_capacities(capacity), parse_priorities(priority)
    if priorities and not capacities:
        raise ValueError("--priority: needs --capacity (the ratios to evaluate each mode at)")
    engine, cfg, step_dir, meta = load_one_rank(src, log=lambda m: print(m, file=sys.stderr))
    family = engine.family.name
    dit_options = {k: v for k, v in dit_options.items() if v is not None}
    if family == "dit":
        from megamoe.commands.eval_dit import evaluate_dit

        if iters is not None or capacities:
            raise ValueError(f"--{'iters' if iters is not None else 'capacity'}: not an option "
                             "of dit runs (their held-out images: --samples)")
        figures = evaluate_dit(engine, cfg, step_dir, meta, log=log, **dit_options)
        log(json.dumps(figures))
        return figures
    if dit_options:
        flag = "--" + next(iter(dit_options)).replace("_", "-")
        raise ValueError(f"{flag}: an option of dit runs (this run's model.family is {family!r})")
    if family not in ("lm", "vit", "vlm"):
        raise ValueError(f"model.family {family!r}: `megamoe eval` evaluates lm, vit, vlm and "
                         "dit")
    if capacities and not _vmoe_routers(engine):
        raise ValueError(f"--capacity: the run's routers ({cfg.model.moe.router!r}) have no "
                         "V-MoE capacity to vary (model.moe.router: vmoe)")
    iters = iters or cfg.train.eval_iters or 1
    _, valid, _ = family_datasets(cfg)
    loader, G = loader_for(engine, valid), cfg.train.global_batch_size
    if family == "vlm":
        from megamoe.commands.eval_vlm import reset_modality_usage

        reset_modality_usage(engine)
    total = _sweep(engine, loader, iters, G, "")
    loss = M.global_loss(total, engine.grid)
    figures = {"checkpoint": step_dir, "step": int(meta["step"]), "family": family,
               "split": "valid", "iters": iters, f"{engine.task.unit}s": int(total["units"]),
               "val_loss": loss}
    if family == "lm":
        figures["perplexity"] = math.exp(min(loss, 700.0))
        log(f"[megamoe] {step_dir} (step {figures['step']}): validation loss {loss:.4f}, "
            f"perplexity {figures['perplexity']:.3f} over {figures['tokens']:,} tokens")
    elif family == "vlm":
        figures.update(_vlm_figures(engine, cfg, total, valid, iters, G, step_dir,
                                    figures["step"], log))
    else:
        from megamoe.config.vision import num_classes

        figures["accuracy"] = M.global_mean(total, engine.grid, "correct")
        figures["chance"] = 1.0 / num_classes(cfg)
        log(f"[megamoe] {step_dir} (step {figures['step']}): validation accuracy "
            f"{figures['accuracy']:.4f} (chance {figures['chance']:.4f}), loss {loss:.4f} "
            f"over {figures['images']:,} images")
    if capacities:
        figures["capacity_table"] = capacity_table(engine, loader, iters, G, capacities,
                                                   priorities or ["none", "max"], log)
    log(json.dumps(figures))
    return figures


def _vlm_figures(engine, cfg, total: dict, valid, iters: int, G: int, step_dir: str,
                 step: int, log) -> dict:
    """Answer accuracy, its image-blind chance, the neighbour-image ablation, caption exact
    match and the expert-usage heat map (megamoe.commands.eval_vlm)."""
    import os

    from megamoe.commands.eval_vlm import (NeighbourImages, blind_figures, modality_usage,
                                           write_usage)
    from megamoe.training import metrics as M
    from megamoe.training.loop import loader_for

    out = {"accuracy": M.global_mean(total, engine.grid, "correct", "questions"),
           "questions": int(total["questions"]),
           "caption_match": M.global_mean(total, engine.grid, "caption_match", "captions"),
           "captions": int(total["captions"])}
    usage = modality_usage(engine)
    if cfg.data.kind == "energon":        # no generator: figures from the batches themselves
        from megamoe.commands.eval_shards import NeighbourInBatch, blind_figures_from_batches

        loader = loader_for(engine, valid)
        out.update(blind_figures_from_batches(loader, iters, G))
        neighbours = NeighbourInBatch(loader)
    else:
        out.update(blind_figures(cfg, iters * G))
        neighbours = loader_for(engine, NeighbourImages(valid))
    shuffled = _sweep(engine, neighbours, iters, G, " (each sample with its neighbour's image)")
    out["shuffled_accuracy"] = M.global_mean(shuffled, engine.grid, "correct", "questions")
    if cfg.data.kind == "clips":
        from megamoe.commands.eval_video import video_figures

        out.update(video_figures(engine, valid, lambda loader, what: _sweep(
            engine, loader, iters, G, what), log))
    if not out["captions"]:   # clips, sounds, caption-free shards: no figure, not a 0
        out["caption_match"] = out["caption_chance"] = None
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    out["expert_usage_png"] = write_usage(usage, run_dir, step, log)
    what = {"sounds": "sound", "clips": "clip"}.get(cfg.data.kind, "image")
    captions = (f"; captions exact {out['caption_match']:.4f} of {out['captions']:,} (blind "
                f"{out['caption_chance']:.4f})" if out["captions"] else "")
    log(f"[megamoe] {step_dir} (step {step}): answer accuracy {out['accuracy']:.4f} on "
        f"{out['questions']:,} questions ({what}-blind chance {out['chance']:.4f}; with the "
        f"neighbour's {what} {out['shuffled_accuracy']:.4f}){captions}")
    return out


def _vmoe_routers(engine) -> list:
    from megamoe.models.lm.model import moe_layers
    from megamoe.moe.routers.vmoe import VMoERouter

    return [layer.router for layer in moe_layers(engine.modules)
            if isinstance(layer.router, VMoERouter)]


def capacity_table(engine, loader, iters: int, G: int, capacities: list[float],
                   priorities: list[str], log=print) -> list[dict]:
    """Accuracy (and loss) with every V-MoE router at inference capacity ratio C and priority
    mode p, for each (p, C); the routers' own settings are restored afterwards."""
    from megamoe.training import metrics as M

    routers = _vmoe_routers(engine)
    saved = [(r.eval_capacity_ratio, r.priority) for r in routers]
    rows = []
    try:
        for mode in priorities:
            for ratio in capacities:
                for r in routers:
                    r.eval_capacity_ratio, r.priority = ratio, mode
                total = _sweep(engine, loader, iters, G, f" C={ratio:g} priority={mode}")
                rows.append({"priority": mode, "capacity": ratio,
                             "accuracy": M.global_mean(total, engine.grid, "correct"),
                             "val_loss": M.global_loss(total, engine.grid)})
    finally:
        for r, (ratio, mode) in zip(routers, saved):
            r.eval_capacity_ratio, r.priority = ratio, mode
    log("[megamoe] inference capacity (V-MoE layers), validation accuracy:")
    log("  capacity  " + "  ".join(f"{m:>9}" for m in priorities))
    for ratio in capacities:
        cells = [next(row["accuracy"] for row in rows
                      if row["priority"] == m and row["capacity"] == ratio) for m in priorities]
        log(f"  {ratio:8g}  " + "  ".join(f"{c:9.4f}" for c in cells))
    return rows
