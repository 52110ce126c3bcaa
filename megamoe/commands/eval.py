"""`megamoe eval RUN`: the newest complete checkpoint of a run (saved under any layout) loaded
on one CPU process and evaluated on the held-out split of its own data config.

For the `lm` family: the mean loss per token over `--iters` global batches of the validation
split (the batches validation uses during training, so the figure is comparable with
`val_loss` in summary.json) and its perplexity. A progress line per batch goes to stderr; the
last line of stdout is one JSON object of the figures.
"""

from __future__ import annotations

import json
import math
import sys
import time


def evaluate_checkpoint(src: str, *, iters: int | None = None, log=print) -> dict:
    """The figures of `src` (a run directory, its checkpoints/ root or a step directory)."""
    from megamoe.commands.convert import load_one_rank
    from megamoe.data.batches import build_datasets
    from megamoe.training import metrics as M
    from megamoe.training.loop import loader_for

    if iters is not None and iters < 1:
        raise ValueError(f"--iters={iters}: must be ≥ 1")
    engine, cfg, step_dir, meta = load_one_rank(src, log=lambda m: print(m, file=sys.stderr))
    if engine.family.name != "lm":
        raise ValueError(f"model.family {engine.family.name!r}: `megamoe eval` evaluates the "
                         "lm family only so far")
    iters = iters or cfg.train.eval_iters or 1
    _, valid, _ = build_datasets(cfg.data, cfg.model.seq_length, cfg.run.seed)
    loader, G = loader_for(engine, valid), cfg.train.global_batch_size
    total = {"loss_sum": 0.0, "units": 0.0}
    start = time.perf_counter()
    for i in range(iters):
        stats = engine.eval_step(loader.peek(i * G))
        total = {k: total[k] + stats[k] for k in total}
        done = time.perf_counter() - start
        print(f"[megamoe] eval batch {i + 1}/{iters} | loss so far "
              f"{total['loss_sum'] / max(total['units'], 1):.4f} | "
              f"{total['units'] / done:.0f} tokens/s", file=sys.stderr, flush=True)
    loss = M.global_loss(total, engine.grid)
    figures = {"checkpoint": step_dir, "step": int(meta["step"]), "family": engine.family.name,
               "split": "valid", "iters": iters, "tokens": int(total["units"]),
               "val_loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    log(f"[megamoe] {step_dir} (step {figures['step']}): validation loss {loss:.4f}, "
        f"perplexity {figures['perplexity']:.3f} over {figures['tokens']:,} tokens")
    log(json.dumps(figures))
    return figures

